# Which model versions may take an alias (champion / challenger / shadow) or a route
# (canary / shadow: myelin.models.Routes).
# input: {alias, requester, model: the same document the serve policy gets,
#         routes: the model's current routes {canary, canary_share, shadow},
#         share: the canary's share of traffic (routes only), champion: its version}
package myelin.promote

import rego.v1

default allow := false

allow if count(reasons) == 0

max_canary_share := 0.5

# a retrained challenger may lose at most this much AUC to the champion on the same holdout
auc_tolerance := 0.01

reasons contains concat("", ["unknown alias ", object.get(input, "alias", ""), ": use champion, challenger, canary or shadow"]) if {
	not input.alias in {"champion", "challenger", "canary", "shadow"}
}

reasons contains "a champion needs a validation AUC of at least 0.6" if {
	input.alias == "champion"
	object.get(input.model.metrics, "auc", 0) < 0.6
}

reasons contains msg if {
	input.alias == "canary"
	share := object.get(input, "share", 0)
	share > max_canary_share
	msg := sprintf("a canary takes at most %.0f%% of the traffic, not %.0f%%", [max_canary_share * 100, share * 100])
}

# Evaluated on the same holdout as the champion (a retrain records both), a candidate that
# is worse than the champion takes no live traffic.
reasons contains msg if {
	input.alias in {"canary", "champion"}
	auc := object.get(input.model.metrics, "auc", 0)
	champion_auc := input.model.metrics.champion_auc
	auc < champion_auc - auc_tolerance
	msg := sprintf("AUC %.3f on the retraining holdout is below the champion's %.3f", [auc, champion_auc])
}

# A retrained version earns its way up: shadow, then canary, then champion.
reasons contains "a retrained version goes to canary only from shadow" if {
	input.alias == "canary"
	input.model.labels.origin == "retrain"
	object.get(input.routes, "shadow", 0) != input.model.version
	object.get(input.routes, "canary", 0) != input.model.version
}

reasons contains "a retrained version becomes champion only from canary" if {
	input.alias == "champion"
	input.model.labels.origin == "retrain"
	object.get(input.routes, "canary", 0) != input.model.version
}

# An alias only routes traffic, so a version that may not be served may not take one:
# inference would refuse to follow the move, and its readiness would fail until undone.
reasons contains reason if {
	some reason in data.myelin.serve.reasons
}
