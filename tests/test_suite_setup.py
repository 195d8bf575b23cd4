"""The test suite's own set-up (tests/conftest.py): what pytest-xdist keeps on one worker."""

from tests.conftest import xdist_unit


def test_a_test_class_is_one_xdist_unit_and_other_tests_go_one_by_one():
  cls = 'tests/test_faults.py::TestFromOneReferenceRun'
  assert xdist_unit(f'{cls}::test_kill_9_mid_run_then_rerun_matches') == cls
  assert xdist_unit(f'{cls}::test_bad[a::b]') == cls
  for test in ('tests/test_faults.py::test_unwritable_workdir', 'tests/t.py::test_x[a::b-1]'):
    assert xdist_unit(test) == test
