from myelin.service import main
from services.warehouse.app import WarehouseApp

main(WarehouseApp, "warehouse")
