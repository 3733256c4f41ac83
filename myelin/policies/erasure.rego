# Who may have a person forgotten (crypto-shredding, online state, warehouse rows).
# input: {requester, reason, subject_hash, caller}
package myelin.erasure

import rego.v1

default allow := false

allow if count(reasons) == 0

reasons contains "an erasure needs a requester" if {
	object.get(input, "requester", "") == ""
}

reasons contains "an erasure needs a reason (e.g. the data subject's request id)" if {
	count(trim_space(object.get(input, "reason", ""))) == 0
}
