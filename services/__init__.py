"""The four Myelin services. They never import each other; they meet on contracts,
subjects and ``proto/``."""
