from myelin.service import main
from services.inference.app import InferenceApp

main(InferenceApp, "inference")
