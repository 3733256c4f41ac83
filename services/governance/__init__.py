"""governance: the policy decision point over Rego policies, with an audit trail."""
