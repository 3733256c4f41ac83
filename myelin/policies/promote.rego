# Which model versions may take an alias (champion / challenger / shadow).
# input: {alias, requester, model: the same document the serve policy gets}
package myelin.promote

import rego.v1

default allow := false

allow if count(reasons) == 0

reasons contains concat("", ["unknown alias ", object.get(input, "alias", ""), ": use champion, challenger or shadow"]) if {
	not input.alias in {"champion", "challenger", "shadow"}
}

reasons contains "a champion needs a validation AUC of at least 0.6" if {
	input.alias == "champion"
	object.get(input.model.metrics, "auc", 0) < 0.6
}

# An alias only routes traffic, so a version that may not be served may not take one:
# inference would refuse to follow the move, and its readiness would fail until undone.
reasons contains reason if {
	some reason in data.myelin.serve.reasons
}
