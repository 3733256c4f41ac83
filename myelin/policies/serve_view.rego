# Which feature view version may be served (the view's served pointer moves to it).
# input: {requester, view, version, served_version, position, served_position,
#         stream_last_seq, lag_messages, behind_served_messages, features_added,
#         features_removed}
package myelin.serve_view

import rego.v1

max_lag_messages := 1000

default allow := false

allow if count(reasons) == 0

reasons contains "promotion needs a requester" if {
	object.get(input, "requester", "") == ""
}

reasons contains msg if {
	input.lag_messages > max_lag_messages
	msg := sprintf("version is %d messages behind the stream (at most %d): let its backfill catch up", [input.lag_messages, max_lag_messages])
}

reasons contains msg if {
	input.behind_served_messages > max_lag_messages
	msg := sprintf("version is %d messages behind the served version (at most %d)", [input.behind_served_messages, max_lag_messages])
}
