from myelin.service import main
from services.ingest.app import IngestApp

main(IngestApp, "ingest")
