"""Every backbone case x compute form through the shared checks of ``tests/model_tester.py``.

nafnet-tiny and the user U-Net run by default; the bigger presets are marked slow.
"""

from __future__ import annotations

import pytest

from tests.model_tester import CASES, FORMS, ModelTester

CASE_PARAMS = [
    pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.slow else [])
    for case in CASES
]


@pytest.fixture(params=CASE_PARAMS)
def case(request):
    return request.param


@pytest.fixture(params=FORMS)
def tester(case, request) -> ModelTester:
    return ModelTester(case, request.param)


def test_fresh_experts_equal_the_base(tester):
    tester.check_fresh_experts_equal_the_base()


def test_routed_equals_the_independent_reference(tester):
    tester.check_routed_equals_the_reference()


def test_merged_equals_the_reference_and_unmerges_exactly(tester):
    tester.check_merged_equals_the_reference_and_unmerges_exactly()


def test_expert_and_gate_gradients_equal_the_reference(tester):
    tester.check_gradients_equal_the_reference()


def test_pinned_gate_serves_a_batch_of_any_size(tester):
    tester.check_pinned_gate_serves_any_batch()


def test_save_load_round_trips_through_both_apis(tester, tmp_path):
    tester.check_save_load_round_trips_through_both_apis(tmp_path)


def test_add_degradation_keeps_old_outputs_bit_identical(tester):
    tester.check_add_degradation_keeps_old_outputs()
