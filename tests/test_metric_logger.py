"""utils.MetricLogger: the report window's means and the epoch's, for every named value."""
import pytest

import utils


def test_window_and_epoch_means_of_named_values():
    m = utils.MetricLogger()
    m.update(loss=1.0, loss_decode=0.75)
    m.update(loss=3.0, loss_decode=2.25)
    means, count, seconds = m.window()
    assert means == {'loss': 2.0, 'loss_decode': 1.5} and count == 2 and seconds >= 0
    m.update(loss=5.0, loss_decode=3.75)
    means, count, _ = m.window()  # a new window after each report
    assert means == {'loss': 5.0, 'loss_decode': 3.75} and count == 1
    assert m.epoch() == pytest.approx({'loss': 3.0, 'loss_decode': 2.25})
