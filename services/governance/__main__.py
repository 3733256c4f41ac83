from myelin.service import main
from services.governance.app import GovernanceApp

main(GovernanceApp, "governance")
