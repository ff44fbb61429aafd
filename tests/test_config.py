"""NPUConfig: defaults, JSON round trip, validation messages, and that every size from 1x1
to 16x16 generates."""

import pytest
from fp8npu.hdl.config import NPUConfig, load_config


def test_defaults_and_geometry():
    cfg = NPUConfig()
    assert (cfg.rows, cfg.cols, cfg.line_bytes, cfg.acc_line_values, cfg.bus_bytes) == (8, 8, 8, 8, 8)
    assert NPUConfig(rows=3, cols=5).line_bytes == 8 and NPUConfig(rows=3, cols=5).acc_line_values == 8
    assert NPUConfig(rows=16, cols=1).line_bytes == 16
    assert NPUConfig().address_space == 1 << 32 and NPUConfig(axi_addr_bits=14).address_space == 16384


def test_json_round_trip(tmp_path):
    cfg = NPUConfig(rows=4, cols=16, formats=("e5m2",), sp_lines=1024, axi_data_bits=128)
    assert NPUConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    assert load_config(path) == cfg
    assert load_config(None) == NPUConfig()


@pytest.mark.parametrize("kwargs, message", [
    ({"rows": 0}, r"^rows must be an integer from 1 to 16, not 0$"),
    ({"cols": 17}, r"^cols must be an integer from 1 to 16, not 17$"),
    ({"rows": True}, r"^rows must be an integer from 1 to 16, not True$"),
    ({"sp_lines": 1000}, r"^sp_lines must be a power of two from 16 to 65536, not 1000$"),
    ({"axi_data_bits": 48}, r"^axi_data_bits must be one of 32, 64, 128, 256, not 48$"),
    ({"queue_depth": 3}, r"^queue_depth must be 0 \(no queues\) or a power of two from 1 to 64, not 3$"),
    ({"queue_depth": 128}, r"^queue_depth must be 0 \(no queues\) or a power of two from 1 to 64, not 128$"),
    ({"queue_depth": False}, r"^queue_depth must be 0 \(no queues\) or a power of two from 1 to 64, not False$"),
    ({"axi_addr_bits": 11}, r"^axi_addr_bits must be an integer from 12 to 32, not 11$"),
    ({"axi_addr_bits": 33}, r"^axi_addr_bits must be an integer from 12 to 32, not 33$"),
    ({"axi_addr_bits": "16"}, r"^axi_addr_bits must be an integer from 12 to 32, not '16'$"),
    ({"formats": ("e4m3", "fp4")}, r"^formats must be a non-empty list of distinct names from e4m3, e5m2, "
                                   r"not \('e4m3', 'fp4'\)$"),
    ({"multipliers": "bram"}, r"^multipliers must be one of dsp, lut, mixed, not 'bram'$"),
    ({"accumulation": "block", "multipliers": "mixed", "dsp_columns": 8},
     r"^dsp_columns must be an integer from 1 to 7, not 8$"),
    ({"accumulation": "block", "multipliers": "mixed"}, r"^dsp_columns must be an integer from 1 to 7, not 0$"),
    ({"accumulation": "block", "multipliers": "lut", "dsp_columns": 2},
     r"^dsp_columns applies to multipliers 'mixed' only; with 'lut' it must be 0, not 2$"),
    ({"accumulation": "block", "multipliers": "mixed", "cols": 1, "dsp_columns": 1},
     r"^multipliers 'mixed' needs at least 2 columns; a 1-column array takes 'dsp' or 'lut'$"),
    ({"multipliers": "lut"}, r"^multipliers 'lut' needs accumulation 'block'; sequential mode takes 'dsp'$"),
    ({"vector_unit": 0}, r"^vector_unit must be true or false, not 0$"),
    ({"fp8_store": "no"}, r"^fp8_store must be true or false, not 'no'$"),
    ({"vector_unit": False, "vector_lanes": 2},
     r"^vector_lanes applies to a built vector unit; with vector_unit false it must be 0, not 2$"),
    ({"fp8_store": False, "store_lanes": 1},
     r"^store_lanes applies to a built requantizer; with fp8_store false it must be 0, not 1$"),
    ({"accumulation": "block", "round_stages": 5}, r"^round_stages must be an integer from 0 to 4, not 5$"),
    ({"accumulation": "block", "add_stages": 0}, r"^add_stages must be an integer from 1 to 5, not 0$"),
    ({"add_stages": 2}, r"^round_stages and add_stages apply to accumulation 'block'; sequential mode takes 4 and 5, "
                        r"not 4 and 2$"),
    ({"accumulation": "block", "pe_stages": 0}, r"^pe_stages must be an integer from 1 to 3, not 0$"),
    ({"pe_stages": 1}, r"^pe_stages applies to accumulation 'block'; sequential mode takes 3, not 1$"),
    ({"check_stages": 3}, r"^check_stages must be an integer from 1 to 2, not 3$"),
    ({"perf_counters": "no"}, r"^perf_counters must be true or false, not 'no'$"),
    ({"token_limit": 0}, r"^token_limit must be an integer from 1 to 65535, not 0$"),
])
def test_invalid_values_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NPUConfig(**kwargs)


def test_json_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^unknown config key 'row'; allowed keys: rows, cols, "):
        NPUConfig.from_json('{"row": 4}')
    with pytest.raises(ValueError, match=r"^config is not valid JSON: "):
        NPUConfig.from_json("{rows: 4")
    with pytest.raises(ValueError, match=r"^an NPU config must be a JSON object, not list$"):
        NPUConfig.from_json("[1]")
    with pytest.raises(ValueError, match=r"^cannot read config file '.*nope.json': No such file or directory$"):
        load_config(tmp_path / "nope.json")


@pytest.mark.parametrize("rows, cols", [(1, 1), (2, 3), pytest.param(16, 16, marks=pytest.mark.slow)])
def test_npu_generates(rows, cols):
    """The NPU elaborates and converts to Verilog (16x16, the largest array, takes minutes: slow)."""
    from fp8npu.hdl.npu import NPU
    from fp8npu.sim.rtl import to_verilog
    cfg = NPUConfig(rows=rows, cols=cols, sp_lines=64, acc_lines=64)
    text = to_verilog(NPU(cfg), "npu")
    assert "module npu" in text and "m_axi_araddr" in text and "s_axil_wdata" in text


@pytest.mark.parametrize("cfg", [
    NPUConfig(), NPUConfig(rows=16, cols=16, axi_data_bits=256, sp_lines=65536, acc_lines=65536),
    NPUConfig(rows=1, cols=1, axi_data_bits=32, sp_lines=16, acc_lines=16, formats=("e5m2",)),
    NPUConfig(rows=5, cols=12, accumulation="block", acc_block=128, formats=("e4m3",)),
    NPUConfig(accumulation="block", acc_block=1),
    NPUConfig(rows=2, cols=2, vector_unit=False), NPUConfig(fp8_store=False),
])
def test_config_register_holds_the_whole_configuration(cfg):
    """CONFIG's fields give back every value a program depends on, and configurations that
    differ in any of them (accumulation mode and block length included) differ in CONFIG."""
    from fp8npu.hdl import isa
    word = isa.config_word(cfg)
    assert 0 <= word < 1 << 32
    f = isa.config_fields(word)
    assert (f["rows"], f["cols"], 8 << f["bus"], 1 << f["sp"], 1 << f["acc"]) == (
        cfg.rows, cfg.cols, cfg.axi_data_bits, cfg.sp_lines, cfg.acc_lines)
    assert (f["e4m3"], f["e5m2"], f["block"]) == (cfg.supports("e4m3"), cfg.supports("e5m2"), cfg.accumulation == "block")
    if cfg.accumulation == "block":
        assert 1 << f["acc_block"] == cfg.acc_block
    other = NPUConfig(**dict(cfg.to_dict(), accumulation="sequential" if cfg.accumulation == "block" else "block"))
    assert isa.config_mismatch(word, other) is not None
    assert isa.config_mismatch(word, cfg) is None
    assert f"{cfg.rows}x{cfg.cols} array" in isa.describe_config_word(word)
    assert (f["no_vector"], f["no_fp8_store"]) == (not cfg.vector_unit, not cfg.fp8_store)
    for name in ("vector_unit", "fp8_store"):
        other = NPUConfig(**dict(cfg.to_dict(), **{name: not getattr(cfg, name)}))
        assert isa.config_mismatch(word, other) is not None
