"""aape.labels: the one global -> local label mapping, covering what training (method's to_local),
evaluation (select_eval_set), the linear probe and the data protocol each did with their own map."""

from __future__ import annotations

import pytest
import torch

from aape.evaluation.classifiers import LinearProbe, NotApplicable
from aape.evaluation.results import select_eval_set
from aape.labels import LabelMismatchError, local_positions, to_local
import aape.method


def test_positions_follow_the_subset_order_and_mark_outsiders():
    assert local_positions(torch.tensor([4, 6, 5, 4, 1, 9]), [6, 4, 5]).tolist() == [1, 0, 2, 1, -1, -1]


def test_lists_tensors_empty_labels_and_negative_labels():
    assert local_positions([4, 6], [4, 5, 6]).tolist() == [0, 2]  # the data protocol took plain lists
    assert local_positions(torch.tensor([], dtype=torch.long), [3]).tolist() == []
    assert local_positions(torch.tensor([-1, 3]), [3]).tolist() == [-1, 0]  # not the table's last entry


def test_to_local_maps_or_names_the_unknown_labels():
    assert to_local(torch.tensor([10, 12, 11]), [10, 11, 12]).dtype == torch.long
    assert to_local(torch.tensor([10, 12, 11]), [10, 11, 12]).tolist() == [0, 2, 1]
    with pytest.raises(LabelMismatchError, match=r"train labels hold global label\(s\) \[3, 7\] that are not among the classes \[0, 1\]"):
        to_local(torch.tensor([0, 7, 3, 7]), [0, 1], "train labels")
    assert issubclass(LabelMismatchError, ValueError)  # what the method's to_local raised


def test_the_method_package_exports_the_one_label_map():
    assert aape.method.to_local is to_local


def test_evaluation_keeps_the_images_of_the_set_with_local_labels():
    features = torch.arange(5.0).unsqueeze(1)
    chosen, local = select_eval_set(features, torch.tensor([2, 0, 3, 2, 1]), [2, 3])
    assert chosen.squeeze(1).tolist() == [0.0, 2.0, 3.0] and local.tolist() == [0, 1, 0]


def test_linear_probe_picks_its_rows_by_class_and_refuses_unseen_classes():
    probe = LinearProbe(torch.eye(3), torch.tensor([0.0, 10.0, 20.0]), [5, 7, 9], 1.0, 1.0)
    logits = probe.logits(torch.tensor([[1.0, 2.0, 3.0]]), [9, 5])
    assert logits.tolist() == [[23.0, 1.0]]
    with pytest.raises(NotApplicable, match="no weights for the 2 class"):
        probe.logits(torch.zeros(1, 3), [5, 6, 8])
