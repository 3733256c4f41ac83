# Retention changes: how long each store keeps what it holds. Asked before a running
# deployment's retention changes (the warehouse applies myelin/retention.py).
package myelin.retention

import rego.v1

default allow := false

allow if count(reasons) == 0

min_audit_days := 2555 # decisions are evidence: about seven years

max_pii_days := 730 # personal data: two years at most

reasons contains "personal data needs a finite retention (0 keeps it forever)" if {
	input.pii
	input.days == 0
}

reasons contains sprintf("personal data may be kept at most %d days, not %d", [max_pii_days, input.days]) if {
	input.pii
	input.days > max_pii_days
}

reasons contains sprintf("audit records must be kept at least %d days, not %d", [min_audit_days, input.days]) if {
	contains(lower(input.resource), "audit")
	input.days > 0
	input.days < min_audit_days
}

reasons contains "a retention is a whole number of days, 0 or more" if {
	not is_number(input.days)
}

reasons contains "a retention is a whole number of days, 0 or more" if {
	is_number(input.days)
	input.days < 0
}
