# Who may replay or backfill streams into the stores.
package myelin.backfill

import rego.v1

default allow := false

allow if count(reasons) == 0

reasons contains "backfill needs a requester" if {
	object.get(input, "requester", "") == ""
}

reasons contains "backfill ranges are limited to 90 days" if {
	input.range_days > 90
}
