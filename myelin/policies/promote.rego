# Which model versions may take an alias (champion / challenger / shadow).
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
