# Who may read personal data (detokenized fields).
package myelin.pii_read

import rego.v1

default allow := false

allow if count(reasons) == 0

reasons contains "reading personal data needs a stated purpose" if {
	object.get(input, "purpose", "") == ""
}

reasons contains concat("", ["role ", role, " may not read personal data"]) if {
	role := object.get(input, "role", "none")
	not role in {"privacy_officer", "support_escalation"}
}
