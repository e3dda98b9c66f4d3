"""The persistent compilation cache of the command-line tools (README, Training: where it lives, `off`)."""

import pathlib

import jax

from bltjax.runtime import compile_cache


def test_cache_lives_under_the_user_cache_unless_the_variable_names_a_folder_or_off(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_cache_dir() == tmp_path / "xdg" / "bltjax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_cache_dir() == pathlib.Path(tmp_path / "home" / ".cache" / "bltjax" / "jax")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compile_cache.default_cache_dir() == tmp_path / "mine"

    before = jax.config.jax_compilation_cache_dir
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        assert compile_cache.enable() == tmp_path / "mine"
        assert (tmp_path / "mine").is_dir() and jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
        jax.config.update("jax_compilation_cache_dir", before)
        monkeypatch.setenv(compile_cache.ENV_VAR, "off")
        assert compile_cache.enable() is None
        assert jax.config.jax_compilation_cache_dir == before  # off: jax's setting untouched
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
