"""zarr 3 and numcodecs >= 0.16 need Python >= 3.11: there, their tests are not collected (the test extra does not
install them either); everywhere else a missing zarr is an error, not a skip."""

import sys

collect_ignore_glob = [] if sys.version_info >= (3, 11) else ["test_numcodecs_*.py", "test_zarr_*.py",
                                                               "test_dask_*.py"]
