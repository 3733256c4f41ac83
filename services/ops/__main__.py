from myelin.service import main
from services.ops.app import OpsApp

main(OpsApp, "ops")
