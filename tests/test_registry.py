import pytest

from survfuse.registry import Registry, UnknownNameError, look_up_option


def test_register_get_list():
    reg: Registry[type] = Registry("fusion")

    @reg.register("co_attention")
    class CoAttention: ...

    reg.add("late", int)
    assert reg.get("co_attention") is CoAttention
    assert reg.list() == ["co_attention", "late"]
    assert "late" in reg and len(reg) == 2


def test_did_you_mean():
    reg: Registry[type] = Registry("fusion")
    reg.add("co_attention", int)
    reg.add("cross_attention", float)
    with pytest.raises(KeyError) as exc:
        reg.get("co_atention")
    assert str(exc.value).startswith("unknown fusion 'co_atention'; did you mean 'co_attention'?")


def test_no_suggestion_for_unrelated_name():
    reg: Registry[type] = Registry("head")
    reg.add("cox", int)
    with pytest.raises(UnknownNameError) as exc:
        reg.get("zzzzzzzz")
    assert "did you mean" not in str(exc.value)
    assert "known: cox" in str(exc.value)


def test_duplicate_registration_refused():
    reg: Registry[type] = Registry("head")
    reg.add("cox", int)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("cox", float)


def test_look_up_option():
    assert look_up_option("efron", ["efron", "breslow"], kind="ties") == "efron"
    with pytest.raises(ValueError, match="did you mean 'breslow'"):
        look_up_option("breslo", ["efron", "breslow"], kind="ties")
