"""The paper-table runs and tools, one module per `python train.py --run NAME`."""
