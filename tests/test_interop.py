import numpy as np
import pandas as pd
import pytest

from survfuse import interop


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    t = rng.exponential(100.0, size=50)
    t[3] = t[4]  # a tie
    e = rng.random(50) < 0.6
    return t, e


def test_sksurv_round_trip(data):
    from sksurv.util import Surv

    t, e = data
    ours = interop.to_sksurv(t, e)
    theirs = Surv.from_arrays(event=e, time=t)
    assert ours.dtype.names == theirs.dtype.names
    np.testing.assert_array_equal(ours["time"], theirs["time"])
    np.testing.assert_array_equal(ours["event"], theirs["event"])
    back = interop.from_sksurv(theirs)
    np.testing.assert_array_equal(back.time, t)
    np.testing.assert_array_equal(back.event, e)


def test_lifelines_round_trip(data):
    from lifelines import CoxPHFitter

    t, e = data
    x = pd.DataFrame({"x": np.arange(len(t), dtype=float) % 7})
    df = interop.to_lifelines(t, e, x)
    # lifelines accepts the frame as-is
    CoxPHFitter().fit(df, duration_col="time", event_col="event")
    back = interop.from_lifelines(df)
    np.testing.assert_array_equal(back.time, t)
    np.testing.assert_array_equal(back.event, e)


def test_pycox_round_trip(data):
    t, e = data
    durations, events = interop.to_pycox(t, e)
    assert durations.dtype == np.float64 and events.dtype == np.float64
    np.testing.assert_array_equal(events, e.astype(float))
    back = interop.from_pycox((durations, events))
    np.testing.assert_array_equal(back.time, t)
    np.testing.assert_array_equal(back.event, e)


def test_integer_event_accepted():
    sd = interop.SurvivalData([1, 2, 3], [0, 1, 1])
    assert sd.event.dtype == bool and sd.n_events == 2 and len(sd) == 3


@pytest.mark.parametrize(
    ("time", "event", "match"),
    [
        ([1.0, np.nan, 3.0], [1, 0, 1], r"time\[1\] = nan"),
        ([1.0, 2.0, np.inf], [1, 0, 1], r"time\[2\] = inf"),
        ([1.0, -2.0, 3.0], [1, 0, 1], r"time must be >= 0; time\[1\] = -2.0"),
        ([1.0, 2.0, 3.0], [1, 2, 1], r"event\[1\] = 2"),
        ([1.0, 2.0, 3.0], [1, 0], "length mismatch"),
        ([], [], "empty"),
        (["a", "b"], [1, 0], "numeric"),
    ],
)
def test_bad_input(time, event, match):
    with pytest.raises(ValueError, match=match):
        interop.SurvivalData(time, event)


def test_check_risk_names_index():
    with pytest.raises(ValueError, match=r"risk\[2\] = nan"):
        interop.check_risk([0.1, 0.2, np.nan], n=3)
    with pytest.raises(ValueError, match="length mismatch"):
        interop.check_risk([0.1, 0.2], n=3)


def test_from_lifelines_missing_column():
    with pytest.raises(ValueError, match="column 'T' not in DataFrame"):
        interop.from_lifelines(pd.DataFrame({"time": [1.0]}), duration_col="T")
