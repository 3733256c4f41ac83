from myelin.service import main
from services.features.app import FeaturesApp

main(FeaturesApp, "features")
