# Which models may be served. Consulted by inference before a model version takes traffic.
# promote.rego includes every reason below, so no alias moves to a version this policy denies.
# input.model: {name, version, alias, provenance: {training_window, feature_views, ...},
#               metrics: {auc, ...}, labels: {...}}
package myelin.serve

import rego.v1

auc_floor := 0.55

default allow := false

allow if count(reasons) == 0

reasons contains "model has no provenance: training_window is missing" if {
	not input.model.provenance.training_window
}

reasons contains "model has no provenance: feature_views is empty" if {
	count(object.get(input.model.provenance, "feature_views", [])) == 0
}

reasons contains msg if {
	auc := input.model.metrics.auc
	auc < auc_floor
	msg := sprintf("validation AUC %.3f is below the serving floor %.2f", [auc, auc_floor])
}

reasons contains "validation AUC is not recorded" if {
	not input.model.metrics.auc
}

reasons contains "model is labelled blocked" if {
	input.model.labels.blocked == "true"
}
