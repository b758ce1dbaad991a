import time
from tests.unit.helpers import CellHarness
def test_x(tmp_path):
    h = CellHarness(tmp_path).start()
    h.build(1)
    t=time.monotonic()
    h.stop(); print("h", time.monotonic()-t)
def test_y(cell):
    cell.build(1)
