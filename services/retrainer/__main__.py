from myelin.service import main
from services.retrainer.app import RetrainerApp

main(RetrainerApp, "retrainer")
