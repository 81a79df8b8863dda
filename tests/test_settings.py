"""Settings: one from_env fills every part, by the documented variable names; bad values are refused naming the
variable and what is allowed; overrides (CLI flags, admin settings) are checked the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.config import Settings
from runtime.errors import ConfigError


def test_each_variable_fills_its_part() -> None:
    s = Settings.from_env({"T2I_MODEL": "sd2.1", "T2I_THREADS": "6", "T2I_WATERMARK": "yes", "T2I_PORT": "9000",
                           "T2I_POLL_INTERVAL": "2.5", "T2I_DATA_DIR": "/srv/t2i", "T2I_ENGINE": "openvino"})
    assert (s.store.model, s.runtime.threads, s.images.watermark) == ("sd2.1", 6, True)
    assert (s.standalone.port, s.standalone.data_dir, s.exapp.poll_interval) == (9000, Path("/srv/t2i"), 2.5)
    assert s.runtime.engine == "openvino"
    assert s.explicit >= {"model", "threads", "watermark", "port", "poll_interval", "data_dir", "engine"}
    assert "model_store" not in s.explicit
    # Unset and empty variables keep the defaults.
    assert Settings.from_env({"T2I_MODEL": ""}) == Settings()


def test_appapi_variables_keep_their_own_names_and_secrets_stay_out_of_logs() -> None:
    s = Settings.from_env({"APP_ID": "text2image_sd2", "APP_SECRET": "s3cret-value", "APP_PORT": "23000",
                           "NEXTCLOUD_URL": "http://nc", "T2I_USERS": "alice:another-secret"})
    assert (s.exapp.app_id, s.exapp.app_port, s.exapp.nextcloud_url) == ("text2image_sd2", 23000, "http://nc")
    assert s.exapp.missing() == ["APP_VERSION"]
    assert "s3cret-value" not in repr(s) and "another-secret" not in repr(s)
    assert Settings.env_names("exapp")["harp_key"] == "HP_SHARED_KEY"


@pytest.mark.parametrize(("env", "words"), [
    ({"T2I_ENGINE": "tensorrt"}, ["T2I_ENGINE='tensorrt'", "auto, onnxruntime, openvino"]),
    ({"T2I_DECODER": "fast"}, ["T2I_DECODER='fast'", "vae, taesd"]),
    ({"T2I_PRECISION": "fp16"}, ["T2I_PRECISION='fp16'", "auto, fp32, bf16"]),
    ({"T2I_FORMAT": "gguf"}, ["T2I_FORMAT='gguf'", "auto, onnx, openvino"]),
    ({"T2I_THREADS": "many"}, ["T2I_THREADS='many'", "whole number"]),
    ({"T2I_WATERMARK": "perhaps"}, ["T2I_WATERMARK='perhaps'", "yes/no"]),
    ({"APP_PORT": "http"}, ["APP_PORT='http'", "whole number"]),
])
def test_a_bad_variable_is_named_with_what_is_allowed(env: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    for word in words:
        assert word in str(err.value)


def test_overrides_are_checked_like_the_environment() -> None:
    s = Settings.from_env({"T2I_THREADS": "8"}, threads=2, model=None)
    assert s.runtime.threads == 2 and s.store.model == "sd-turbo"
    assert s.updated(decoder="taesd").runtime.decoder == "taesd"
    with pytest.raises(ConfigError, match="T2I_DECODER='fast'"):
        s.updated(decoder="fast")
    with pytest.raises(ConfigError, match="setting 'steps' is not known"):
        s.updated(steps=2.5)
    with pytest.raises(ConfigError, match=r"T2I_MAX_BATCH=1\.5 is not a whole number"):
        s.updated(max_batch=1.5)


def test_the_thread_cap_is_split_between_workers() -> None:
    s = Settings().updated(threads=8)
    assert [s.threads_per_worker(n) for n in (1, 3, 8, 20)] == [8, 2, 1, 1]


def test_the_runtime_settings_are_the_pipelines_load_options(onnx_bundle: Path) -> None:
    from runtime import LoadOptions, Pipeline
    from runtime.engines import default_threads

    s = Settings.from_env({"T2I_THREADS": "1", "T2I_ENGINE": "onnxruntime", "T2I_DEVICE": "cpu"})
    assert isinstance(s.runtime, LoadOptions)
    pipe = Pipeline.load(onnx_bundle, s.runtime)
    assert (pipe.engine, pipe.device, pipe.threads) == ("onnxruntime", "cpu", 1)
    assert Pipeline.load(onnx_bundle, s.runtime, threads=0).threads == default_threads(), "0: every core"
    with pytest.raises(ConfigError, match="load option 'devise' is not known; use device, engine, threads, decoder"):
        Pipeline.load(onnx_bundle, devise="cpu")
    with pytest.raises(ConfigError, match="compile_cache needs a folder"):
        Pipeline.load(onnx_bundle, s.runtime, compile_cache=True)
