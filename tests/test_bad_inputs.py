"""Bad inputs, table-driven, through the real CLI: exit 2, one line naming the problem, no traceback, nothing at OUT.

Each case builds a broken input in a tmp dir (starting from examples/tiny) and returns the CLI
arguments. Pickle and YAML cases also check that no code ran (their payload would create a file).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from soupkit.cli import main
from soupkit.errors import SoupkitError

from conftest import TINY, tiny_recipe

WEIGHTS = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


class Payload:
    """A pickle whose loading would create the file ``PWNED`` (it must never be unpickled)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


# ---- builders ------------------------------------------------------------------------------------


def adapter_copy(d: Path, name: str = "math") -> Path:
    dest = d / name
    if not dest.exists():
        shutil.copytree(TINY / "adapters" / name, dest)
    return dest


def edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(adapter: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(adapter / WEIGHTS)
    fn(tensors)
    save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})


def recipe_file(d: Path, data: object) -> Path:
    path = d / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def merge_args(d: Path, data: object) -> list[str]:
    return ["merge", str(recipe_file(d, data)), "-o", str(d / "out"), "--quiet"]


def with_math(d: Path, **merge: object) -> dict:
    """The tiny recipe with its 'math' adapter replaced by a copy in ``d`` (edit it freely)."""
    recipe = tiny_recipe("cat", **merge)
    recipe["adapters"][0]["path"] = str(adapter_copy(d))
    return recipe


def saved_head(shape: tuple[int, int]) -> Callable[[Path], None]:
    """An edit: a modules_to_save copy of lm_head of ``shape`` (the base's is (100, 64))."""

    def edit(adapter: Path) -> None:
        edit_config(adapter, modules_to_save=["lm_head"])
        edit_tensors(adapter, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(shape)}))

    return edit


def broken_adapter(edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """A case: copy 'math', apply ``edit`` to the copy, merge."""

    def build(d: Path) -> list[str]:
        recipe = with_math(d)
        edit(adapter_copy(d))
        return merge_args(d, recipe)

    return build


def recipe_case(change: Callable[[dict], object]) -> Callable[[Path], list[str]]:
    """A case: the valid tiny recipe, edited in place by ``change``."""

    def build(d: Path) -> list[str]:
        recipe = tiny_recipe("cat")
        change(recipe)
        return merge_args(d, recipe)

    return build


def raw_weights(content: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        path = adapter / WEIGHTS
        path.write_bytes(content(path.read_bytes()))

    return edit


def set_tensor(key: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        edit_tensors(adapter, lambda t: t.__setitem__(key, fn(t[key])))

    return edit


def embedding_with_base_copy(copy_shape: tuple[int, int]) -> Callable[[Path], None]:
    """Add an embedding LoRA plus PEFT's saved copy of the embedding, filled with values that differ from the base."""

    def edit(adapter: Path) -> None:
        prefix = "base_model.model.model.embed_tokens."
        gen = torch.Generator().manual_seed(0)
        extra = {
            prefix + "lora_embedding_A": torch.randn(4, 100, generator=gen),
            prefix + "lora_embedding_B": torch.randn(64, 4, generator=gen),
            prefix + "base_layer.weight": torch.randn(*copy_shape, generator=gen),
        }
        edit_tensors(adapter, lambda t: t.update(extra))
        targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
        edit_config(adapter, target_modules=["embed_tokens", *targets])

    return edit


def pickle_only(adapter: Path) -> None:
    (adapter / WEIGHTS).unlink()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Payload(str(adapter.parent / "PWNED"))))


def rename_layer(adapter: Path) -> None:
    edit_tensors(
        adapter, lambda t: [t.__setitem__(k.replace("layers.0.", "layers.7."), t.pop(k)) for k in list(t) if "layers.0." in k]
    )


def broken_base(edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        base = d / "base"
        shutil.copytree(TINY / "base", base)
        edit(base)
        recipe = tiny_recipe("cat")
        recipe["base_model"] = str(base)
        return merge_args(d, recipe)

    return build


def base_pickle_only(base: Path) -> None:
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(str(base.parent / "PWNED"))))


def different_bases(d: Path) -> list[str]:
    """'math' names a base whose config has another layer count (a differing name alone is only a warning)."""
    recipe = with_math(d)
    other = d / "Llama-3.1-8B"
    other.mkdir()
    config = json.loads((TINY / "base" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 32}))
    edit_config(adapter_copy(d), base_model_name_or_path=str(other))
    return merge_args(d, recipe)


def hub_not_cached(d: Path) -> list[str]:
    recipe = tiny_recipe("cat")
    recipe["adapters"][1]["path"] = "some-org/not-downloaded@v1"
    return merge_args(d, recipe)


def python_tag(d: Path) -> list[str]:
    marker = d / "PWNED"
    return merge_args(d, f'base_model: !!python/object/apply:os.system ["touch {marker}"]\n')


def real_dora(d: Path) -> list[str]:
    """A DoRA adapter written by PEFT itself, with a method that works on LoRA factors (refused: t_i is not B @ A)."""
    from soupkit.testing import make_lora

    make_lora(TINY / "base", d / "dora", seed=3, r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    recipe = tiny_recipe("lego")
    recipe["adapters"][0]["path"] = str(d / "dora")
    return merge_args(d, recipe)


def output_exists(d: Path) -> list[str]:
    (d / "out").mkdir()
    (d / "out" / "keep.txt").write_text("mine")
    return merge_args(d, tiny_recipe("cat"))


def density_case(d: Path) -> list[str]:
    from soupkit.methods.registry import REGISTRY

    method = next((m for m in ("ties", "dare_ties", "dare_linear") if m in REGISTRY), None)
    if method is None:
        pytest.skip("no method with a density parameter is registered yet")
    return merge_args(d, tiny_recipe(method, density=1.5))


def raw_recipe_case(edit: Callable[[str], str], command: str = "merge") -> Callable[[Path], list[str]]:
    """A case: the tiny recipe as YAML text, edited as text (for .nan, duplicate keys, aliases)."""

    def build(d: Path) -> list[str]:
        text = edit(yaml.safe_dump(tiny_recipe("cat"), sort_keys=False))
        if command == "merge":
            return merge_args(d, text)
        return [command, str(recipe_file(d, text))]

    return build


def validate_case(change: Callable[[dict], object]) -> Callable[[Path], list[str]]:
    """A case: ``soupkit validate`` on the tiny recipe edited by ``change`` (validate must refuse what merge would)."""

    def build(d: Path) -> list[str]:
        recipe = tiny_recipe("cat")
        change(recipe)
        return ["validate", str(recipe_file(d, recipe))]

    return build


def method_case(method: str, **merge: object) -> Callable[[Path], list[str]]:
    return lambda d: merge_args(d, tiny_recipe(method, **merge))


def fp16_overflow(d: Path) -> list[str]:
    recipe = tiny_recipe("cat", weights=(1e6, 1.0))
    recipe["dtype"] = "float16"
    return merge_args(d, recipe)


def export_fp16_overflow(d: Path) -> list[str]:
    """A float16 base (max 65504) exported with a weight that overflows it after the cast."""
    base = d / "fp16" / "base"  # named as the adapters name their base: no warning beside the one error line
    shutil.copytree(TINY / "base", base)
    tensors = load_file(base / "model.safetensors")
    save_file({k: v.half() for k, v in tensors.items()}, base / "model.safetensors", metadata={"format": "pt"})
    recipe = tiny_recipe("cat", weights=(1e6, 1.0))
    recipe.update(base_model=str(base), output="model")
    recipe.pop("dtype")  # a full model keeps the base's dtype (a recipe dtype would add a warning line)
    return merge_args(d, recipe)


ALIAS_BOMB = "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}" if i else "x"] * 10) + "]\n" for i in range(10)
)


def target_outside_config(adapter: Path) -> None:
    """The adapter's config stops naming k_proj while its k_proj tensors stay (PEFT ignores them)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    edit_config(adapter, target_modules=[m for m in config["target_modules"] if m != "k_proj"])


def fit_data_typo(d: Path) -> list[str]:
    (d / "calib.jsonl").write_text('{"text": "hello world"}\n{"text": "more text"}\n')
    recipe = recipe_file(d, tiny_recipe("cat"))
    return ["fit-alpha", str(recipe), "--data", str(d / "calib.jsonll"), "-o", str(d / "out"), "--device", "cpu"]


def fit_data_bad_line(d: Path) -> list[str]:
    (d / "calib.jsonl").write_text('{"text": "hello world"}\n{"txt": "no text field"}\n')
    recipe = recipe_file(d, tiny_recipe("cat"))
    return ["fit-alpha", str(recipe), "--data", str(d / "calib.jsonl"), "-o", str(d / "out"), "--device", "cpu"]


def fit_case(
    data: bytes = b'{"text": "hello world"}\n{"text": "more text"}\n', *flags: str, base: Path | None = None
) -> Callable[[Path], list[str]]:
    """A case: fit-alpha on the tiny recipe (its base replaced by ``base`` if given) with ``data`` and ``flags``."""

    def build(d: Path) -> list[str]:
        (d / "calib.jsonl").write_bytes(data)
        recipe = tiny_recipe("cat")
        if base is not None:
            shutil.copytree(TINY / "base", d / "base", ignore=shutil.ignore_patterns("tokenizer*"))
            recipe["base_model"] = str(d / "base")
        path = recipe_file(d, recipe)
        return ["fit-alpha", str(path), "--data", str(d / "calib.jsonl"), "-o", str(d / "out"), "--device", "cpu", *flags]

    return build


# ---- the table -----------------------------------------------------------------------------------

CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    # recipe files
    ("yaml_syntax", lambda d: merge_args(d, "base_model: [unclosed\n"), "valid YAML"),
    ("yaml_not_mapping", lambda d: merge_args(d, "- just\n- a list\n"), "a mapping with base_model"),
    ("yaml_python_tag", python_tag, "valid YAML"),
    ("recipe_missing", lambda d: ["merge", str(d / "nope.yaml"), "-o", str(d / "out")], "no such file"),
    ("unknown_top_key", recipe_case(lambda r: r.update(adaptors=[])), "unknown key 'adaptors'"),
    ("unknown_merge_key", recipe_case(lambda r: r["merge"].update(rnak=4)), "unknown key 'rnak' (did you mean 'rank'?)"),
    ("unknown_adapter_key", recipe_case(lambda r: r["adapters"][0].update(wieght=1)), "unknown key 'wieght'"),
    ("unknown_method", recipe_case(lambda r: r["merge"].update(method="catt")), "did you mean 'cat'"),
    (
        "weight_wrong_type",
        recipe_case(lambda r: r["adapters"][0].update(weight="heavy")),
        "adapters[0].weight: expected a number or a list, found 'heavy'",
    ),
    (
        "weight_empty_list",
        recipe_case(lambda r: r["adapters"][0].update(weight=[])),
        "adapters[0].weight: expected a number or a list of at least one number, found an empty list []",
    ),
    ("missing_base_model", recipe_case(lambda r: r.pop("base_model")), "add 'base_model'"),
    ("no_adapters", recipe_case(lambda r: r.update(adapters=[])), "adapters"),
    ("duplicate_names", recipe_case(lambda r: r["adapters"][1].update(name="math")), "duplicate adapter name 'math'"),
    (
        "duplicate_names_say_where",
        recipe_case(lambda r: r["adapters"][1].update(name="math")),
        "recipe.yaml: adapters[1].name: expected a name no other adapter has, found duplicate",
    ),
    ("rank_zero", recipe_case(lambda r: r["merge"].update(rank=0)), "merge.rank"),
    ("bad_dtype", recipe_case(lambda r: r.update(dtype="float8")), "dtype"),
    (
        "override_unknown_adapter",
        recipe_case(lambda r: r["merge"].update(modules=[{"match": "*", "weights": {"maths": 1}}])),
        "did you mean 'math'",
    ),
    (
        "override_unknown_adapter_where",
        recipe_case(lambda r: r["merge"].update(modules=[{"match": "*", "weights": {"maths": 1}}])),
        "merge.modules[0].weights.maths: expected an adapter name, one of math, code, found 'maths'",
    ),
    ("cat_given_density", recipe_case(lambda r: r["merge"].update(density=0.5)), "unknown key 'density'"),
    ("density_out_of_range", density_case, "density"),
    # numbers that are not numbers, ranks and globs (validate refuses them too)
    (
        "weight_nan",
        raw_recipe_case(lambda t: t.replace("weight: 1.0", "weight: .nan", 1)),
        "adapters[0].weight: expected a finite number",
    ),
    ("weight_inf", raw_recipe_case(lambda t: t.replace("weight: 1.0", "weight: .inf", 1)), "found .inf"),
    ("weight_nan_validate", raw_recipe_case(lambda t: t.replace("weight: 1.0", "weight: .nan", 1), "validate"), "found .nan"),
    (
        "gradient_inf",
        recipe_case(lambda r: r["adapters"][1].update(weight=[1.0, float("inf")])),
        "adapters[1].weight[1]: expected a finite",
    ),
    (
        "module_weight_nan",
        recipe_case(lambda r: r["merge"].update(modules=[{"match": "*", "weights": {"code": float("nan")}}])),
        "merge.modules[0].weights.code",
    ),
    ("ties_lambda_inf", method_case("ties", **{"lambda": float("inf")}), "merge.lambda: expected a finite number"),
    ("density_nan", method_case("ties", density=float("nan")), "merge.density: expected a finite number"),
    ("della_epsilon_inf", method_case("della", epsilon=float("inf")), "merge.epsilon: expected a finite number"),
    (
        "della_epsilon_too_wide_says_so",
        method_case("della", density=0.1, epsilon=0.2),
        "merge.epsilon: expected at most min(density, 1 - density) = 0.1 (keep probabilities in [0, 1]), found 0.2",
    ),
    (
        "breadcrumbs_gamma_plus_density",
        method_case("breadcrumbs", density=0.8, gamma=0.5),
        "merge.gamma: expected gamma + density <= 1 (the outliers dropped and the entries kept do not overlap), found 0.5 + 0.8",
    ),
    (
        "weight_yes_is_not_1",
        recipe_case(lambda r: r["adapters"][0].update(weight=True)),
        "adapters[0].weight: expected a number or a list, found True",
    ),
    ("rank_true", method_case("svd", rank=True), "merge.rank: expected an integer, found True"),
    ("density_quoted", method_case("ties", density="0.5"), "merge.density: expected a number, found '0.5'"),
    ("rank_huge", method_case("svd", rank=1_000_000_000), "merge.rank: expected at most 12"),
    ("rank_huge_validate", lambda d: ["validate", str(recipe_file(d, tiny_recipe("ties", rank=10**9)))], "expected at most 64"),
    ("rank_huge_plan", lambda d: ["plan", str(recipe_file(d, tiny_recipe("linear", rank=10**9)))], "expected at most 12"),
    (
        "rank_above_core_space",
        method_case("ties", rank=20, space="core"),
        "merge.rank: expected at most 12 (the sum of the input ranks",
    ),
    ("rank_ignored_by_cat", method_case("cat", rank=4), "no merge.rank with 'cat'"),
    (
        "glob_matches_nothing",
        recipe_case(lambda r: r["merge"].update(modules=[{"match": "*.mpl.*", "weights": {"math": 2}}])),
        "did you mean '*.mlp.*'",
    ),
    (
        "glob_typo_validate",
        validate_case(lambda r: r["merge"].update(modules=[{"match": "model.layers.1.self_attn.q_prj", "weights": {"math": 2}}])),
        "did you mean 'model.layers.1.self_attn.q_proj'",
    ),
    ("target_outside_config", broken_adapter(target_outside_config), "PEFT never applies others"),
    # what is written is what was checked
    ("fp16_overflow", fp16_overflow, "beyond float16's maximum"),
    ("export_fp16_overflow", export_fp16_overflow, "beyond float16's maximum"),
    # YAML and messages
    (
        "pydantic_message_form",
        recipe_case(lambda r: r["adapters"][0].update(weight=[1.0, "x"])),
        "adapters[0].weight[1]: expected a number, found 'x';",
    ),
    ("value_1mb_echo_short", recipe_case(lambda r: r["adapters"][0].update(weight="x" * 2**20)), "found 'xxxx"),
    ("method_name_1mb", recipe_case(lambda r: r["merge"].update(method="x" * 2**20)), "merge.method: expected one of"),
    ("adapter_path_1mb", recipe_case(lambda r: r["adapters"][0].update(path="a/" * 2**19)), "adapters[0].path"),
    ("recipe_10mb", recipe_case(lambda r: r["adapters"][0].update(weight="x" * 10 * 2**20)), "a recipe of at most 4 MB"),
    ("alias_bomb", lambda d: merge_args(d, ALIAS_BOMB), "an alias bomb"),
    ("alias_recursive", lambda d: merge_args(d, "a: &a [1, *a]\n"), "an alias bomb"),
    (
        "duplicate_keys",
        raw_recipe_case(lambda t: t.replace("dtype: float32", "dtype: float32\ndtype: float16")),
        "a second 'dtype'",
    ),
    (
        "duplicate_adapter_keys",
        raw_recipe_case(lambda t: t.replace("weight: 1.0", "weight: 1.0\n  weight: 2.0", 1)),
        "a second 'weight'",
    ),
    ("deep_nesting", lambda d: merge_args(d, "[" * 50_000), "nesting"),
    (
        "integer_of_5000_digits",
        raw_recipe_case(lambda t: t.replace("weight: 1.0", "weight: " + "9" * 5000, 1)),
        "recipe.yaml:5: expected a number of at most 4300 digits",
    ),
    ("seed_of_5000_digits_validate", raw_recipe_case(lambda t: t + "seed: " + "1" * 5000 + "\n", "validate"), "4300 digits"),
    # YAML 1.2 numbers: 2e1 is the number 20 (YAML 1.1 read the string '2e1'), so it is judged as a density
    ("density_exponent_is_a_number", method_case("ties", density="2e1"), "merge.density: expected a number <= 1.0, found 20.0"),
    ("recipe_is_a_directory", lambda d: ["merge", str(TINY), "-o", str(d / "out")], "expected a recipe file, found a directory"),
    ("inspect_a_file", lambda d: ["inspect", str(TINY / "base" / "config.json")], "found a file (config.json)"),
    # fit-alpha reads its data before the base model
    ("fit_data_typo", fit_data_typo, "no such file"),
    ("fit_data_typo_did_you_mean", fit_data_typo, "did you mean 'calib.jsonl'"),
    ("fit_data_bad_record", fit_data_bad_line, "a 'text', 'prompt'+'completion' or 'messages' field"),
    ("fit_lr_nan", fit_case(b'{"text": "a b c"}\n', "--lr", "nan"), "--lr: expected a finite number > 0, found nan"),
    ("fit_lr_inf", fit_case(b'{"text": "a b c"}\n', "--lr", "inf"), "--lr: expected a finite number > 0, found inf"),
    ("fit_epochs_nan", fit_case(b'{"text": "a b c"}\n', "--epochs", "nan"), "--epochs: expected a finite number > 0"),
    ("fit_data_not_utf8", fit_case(b'{"text": "hello"}\n{"text": "caf\xe9"}\n'), "calib.jsonl:2: expected UTF-8 text"),
    ("fit_text_not_a_string", fit_case(b'{"text": "hello"}\n{"text": 123}\n'), "record 1: expected 'text' as a string"),
    (
        "fit_completion_not_a_string",
        fit_case(b'{"prompt": "1+1=", "completion": [2]}\n'),
        "record 0: expected 'completion' as a string",
    ),
    ("fit_base_without_tokenizer", fit_case(base=TINY / "base"), "expected tokenizer files (tokenizer.json, tokenizer.model"),
    # references
    ("base_missing", recipe_case(lambda r: r.update(base_model="/nonexistent/base")), "an existing directory"),
    ("adapter_missing", recipe_case(lambda r: r["adapters"][0].update(path="./no/such/adapter")), "an existing directory"),
    ("hub_not_cached_offline", hub_not_cached, "HF_HUB_OFFLINE is set"),
    ("output_exists", output_exists, "--overwrite"),
    # adapter files
    ("config_missing", broken_adapter(lambda a: (a / "adapter_config.json").unlink()), "no such file"),
    ("config_bad_json", broken_adapter(lambda a: (a / "adapter_config.json").write_text("{r: 4,")), "valid JSON"),
    ("config_r_string", broken_adapter(lambda a: edit_config(a, r="four")), "an integer >= 1"),
    ("config_bad_pattern", broken_adapter(lambda a: edit_config(a, rank_pattern={"q_proj(": 2})), "regular-expression keys"),
    ("config_r_disagrees", broken_adapter(lambda a: edit_config(a, r=16)), "rank 16 (from adapter_config.json)"),
    ("pickle_only", broken_adapter(pickle_only), "pickles are never loaded"),
    ("no_weights", broken_adapter(lambda a: (a / WEIGHTS).unlink()), "no weights"),
    ("truncated_data", broken_adapter(raw_weights(lambda b: b[:-100])), "truncated"),
    ("truncated_header", broken_adapter(raw_weights(lambda b: b[:5])), "a safetensors file"),
    ("header_cut_short", broken_adapter(raw_weights(lambda b: b[:40])), "a complete safetensors header"),
    (
        "random_bytes_are_not_truncated",
        broken_adapter(raw_weights(lambda b: random.Random(0).randbytes(len(b)))),
        "expected a safetensors file (an 8-byte header length of at most 100 MB, then JSON), found other bytes",
    ),
    ("header_not_json", broken_adapter(raw_weights(lambda b: struct.pack("<Q", 16) + b"\xff" * 16)), "a JSON safetensors header"),
    (
        "header_bad_entries",
        broken_adapter(raw_weights(lambda b: struct.pack("<Q", 16) + b'{"x": {"a": 1}} ')),
        "malformed entries",
    ),
    ("nan_in_tensor", broken_adapter(set_tensor(Q_A, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))), "NaN or Inf"),
    ("inf_in_tensor", broken_adapter(set_tensor(Q_B, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")))), "NaN or Inf"),
    ("shape_vs_base", broken_adapter(set_tensor(Q_A, lambda t: t[:, :32].contiguous())), "(64, 32)"),
    (
        "rank_zero_tensors",
        broken_adapter(lambda a: edit_tensors(a, lambda t: t.update({Q_A: torch.zeros(0, 64), Q_B: torch.zeros(64, 0)}))),
        "rank 0",
    ),
    ("missing_lora_B", broken_adapter(lambda a: edit_tensors(a, lambda t: t.pop(Q_B))), "both lora_A and lora_B"),
    ("int_tensor", broken_adapter(set_tensor(Q_A, lambda t: t.to(torch.int32))), "a float tensor"),
    ("conv_lora", broken_adapter(set_tensor(Q_A, lambda t: t[:, :, None, None].contiguous())), "conv LoRAs are not supported"),
    (
        "unknown_tensor",
        broken_adapter(
            lambda a: edit_tensors(a, lambda t: t.update({Q_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(64)}))
        ),
        "another tensor",
    ),
    (
        "module_not_in_base",
        broken_adapter(rename_layer),
        "found no tensor model.layers.7.mlp.down_proj.weight in the base (keys as transformers loads LlamaForCausalLM); nearest: model.layers.1.mlp.down_proj.weight",
    ),
    (
        "embedding_copy_trained",
        broken_adapter(embedding_with_base_copy((100, 64))),
        "different values (trained or resized embeddings)",
    ),
    ("embedding_copy_resized", broken_adapter(embedding_with_base_copy((101, 64))), "(a resized vocabulary)"),
    ("dora_config", broken_adapter(lambda a: edit_config(a, use_dora=True)), "lora_magnitude_vector (use_dora: true)"),
    ("dora_built_by_peft", real_dora, "with DoRA adapter(s)"),
    (
        "lora_bias_tensor_without_flag",
        broken_adapter(
            lambda a: edit_tensors(a, lambda t: t.update({Q_A.replace("lora_A.weight", "lora_B.bias"): torch.ones(64)}))
        ),
        "another tensor",
    ),
    ("modules_to_save_resized", broken_adapter(saved_head((101, 64))), "(a resized vocabulary?)"),
    ("bias_all", broken_adapter(lambda a: edit_config(a, bias="all")), "bias: 'all'"),
    ("pissa_init", broken_adapter(lambda a: edit_config(a, init_lora_weights="pissa")), "rewrites the base weights"),
    ("not_lora", broken_adapter(lambda a: edit_config(a, peft_type="IA3")), "peft_type LORA"),
    ("mismatched_base_models", different_bases, "whose config differs: num_hidden_layers 32"),
    # base model
    ("base_config_bad_json", broken_base(lambda b: (b / "config.json").write_text("{")), "valid JSON"),
    ("base_pickle_only", broken_base(base_pickle_only), "no safetensors weights"),
    ("base_no_config", broken_base(lambda b: (b / "config.json").unlink()), "config.json"),
    # verify
    ("verify_no_lock", lambda d: ["verify", str(d / "out")], "no lock file"),
]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest): the inputs' bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


TINY_BEFORE = tree_hashes(TINY)


@pytest.mark.parametrize("name,build,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, build: Callable, fragment: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # empty: nothing is cached, nothing is fetched
    args = build(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    inputs_before = tree_hashes(tmp_path)
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    seconds = time.perf_counter() - start
    text = result.output
    assert result.exit_code == 2, text
    assert fragment in text, text
    assert "Traceback" not in text
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr[:2000]  # ONE line
    assert len(errors[0]) < 600, errors[0][:2000]
    assert seconds < 20, f"{name} took {seconds:.1f} s to fail"
    if name == "output_exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    else:
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp dirs left, no payload ran
    assert tree_hashes(tmp_path) == inputs_before  # the inputs' bytes are unchanged
    assert not (tmp_path / "PWNED").exists()


def test_shipped_example_untouched_by_the_table() -> None:
    assert tree_hashes(TINY) == TINY_BEFORE


@pytest.mark.parametrize("payload", ["alias_bomb", "alias_recursive", "value_1mb_echo_short", "recipe_10mb"])
def test_huge_inputs_fail_fast_and_print_little(tmp_path: Path, payload: str) -> None:
    build = next(c[1] for c in CASES if c[0] == payload)
    args = build(tmp_path)
    start = time.perf_counter()
    result = CliRunner().invoke(main, args)
    assert time.perf_counter() - start < 2.0
    assert result.exit_code == 2 and len(result.output) < 400, result.output[:1000]


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


FORBIDDEN = {
    "trust_remote_code": r"trust_remote_code\s*=\s*True",
    "unpickling": r"\bpickle\.loads?\(|\btorch\.load\(|\bjoblib\.load\(",
    "unsafe YAML": r"\byaml\.(unsafe_)?load\(|\bLoader\s*=",
    "eval/exec": r"(?<![\w.])(eval|exec|compile|__import__)\(",
    "shell": r"\bos\.system\(|\bsubprocess\b|\bos\.popen\(",
}


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_no_code_execution_paths_in_the_package(what: str) -> None:
    """No soupkit module can run code it reads: no remote code, pickles, unsafe YAML, eval or shell."""
    import re

    import soupkit

    pattern = re.compile(FORBIDDEN[what])
    hits = [
        f"{path.name}:{i}: {line.strip()}"
        for path in Path(soupkit.__file__).parent.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith("#")
    ]
    assert hits == [], hits


# ---- inputs that must work (each failed before issue 24) ---------------------------------------


def test_yaml_12_numbers_are_numbers(tmp_path: Path) -> None:
    """`weight: 1e6` and `density: 2e-1` are numbers (YAML 1.2), not the strings PyYAML's YAML 1.1 made of them."""
    from soupkit.recipe import load_recipe

    text = yaml.safe_dump(tiny_recipe("ties", density=0.5), sort_keys=False)
    path = recipe_file(tmp_path, text.replace("weight: 1.0", "weight: 1e6", 1).replace("density: 0.5", "density: 2e-1"))
    recipe = load_recipe(path)
    assert recipe.adapters[0].weight == 1e6 and recipe.merge.params.density == 0.2  # type: ignore[attr-defined]
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["-", "/dev/stdin"])
def test_recipe_from_stdin_resolves_paths_from_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    shutil.copytree(TINY / "adapters" / "math", tmp_path / "math")
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe("cat")
    recipe["adapters"] = [{"name": "math", "path": "math"}]  # relative: to the current folder
    before = tree_hashes(tmp_path)
    result = CliRunner().invoke(main, ["merge", name, "-o", "out", "--quiet"], input=yaml.safe_dump(recipe))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert {k: v for k, v in tree_hashes(tmp_path).items() if not k.startswith("out/")} == before


def test_default_output_rank_is_capped_like_an_explicit_one(tmp_path: Path) -> None:
    """Nine rank-8 adapters under ties: the default rank (sum 72) is capped at min(d_out, d_in) = 64.

    Before, r was 72 and every 64x64 module carried at least 8 all-zero rows in A (a 64x64 matrix has rank <= 64).
    """
    recipe = tiny_recipe("ties")
    code = recipe["adapters"][1]
    recipe["adapters"] = [{**code, "name": f"code{i}"} for i in range(9)]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, merge_args(tmp_path, recipe))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 64
    tensors = load_file(out / WEIGHTS)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (64, 64)


def test_methods_brief_is_aligned() -> None:
    lines = CliRunner().invoke(main, ["methods", "--brief"]).output.splitlines()
    starts = {line.index("[") for line in lines}
    summaries = {line.index("]") + 3 for line in lines}
    assert len(lines) >= 10 and len(starts) == 1 and all(line[max(summaries) - 1] == " " for line in lines)


def test_plan_explains_its_rank_columns() -> None:
    out = CliRunner().invoke(main, ["plan", str(Path(__file__).parents[1] / "recipes" / "ties.yaml")]).output
    assert "merged rank" in out and "written r" in out and "rank in" not in out
    assert "merged rank: the rank of the module's merged update" in out


def test_docs_site_lists_each_page_once() -> None:
    nav = yaml.safe_load((Path(__file__).parents[1] / "mkdocs.yml").read_text())["nav"]
    pages = [page for entry in nav for page in entry.values()]
    assert len(pages) == len(set(pages)), pages


# ---- doubtful but usable: exit 0, each doubt one `warning:` line, inputs untouched -----------------


def run_warned(tmp_path: Path, args: list[str], *fragments: str) -> object:
    """Run the CLI; assert exit 0, only `warning:` lines on stderr (each expected one among them), inputs unchanged."""
    inputs_before = tree_hashes(TINY)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and all(line.startswith("warning: ") for line in lines), result.stderr[:2000]
    for fragment in fragments:
        assert sum(fragment in line for line in lines) == 1, (fragment, lines)
    assert tree_hashes(TINY) == inputs_before
    return result


def test_model_output_from_a_base_without_tokenizer_warns(tmp_path: Path) -> None:
    shutil.copytree(TINY / "base", tmp_path / "base", ignore=shutil.ignore_patterns("tokenizer*"))
    recipe = tiny_recipe("cat")
    recipe.update(base_model=str(tmp_path / "base"), output="model")
    run_warned(tmp_path, merge_args(tmp_path, recipe), "has no tokenizer files (tokenizer.json, tokenizer.model, ...)")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_dtype_of_a_model_output_is_named_as_unused(tmp_path: Path) -> None:
    recipe = tiny_recipe("cat")
    recipe.update(output="model", dtype="float16")  # the tiny base is float32
    run_warned(tmp_path, merge_args(tmp_path, recipe), "dtype: float16 applies to adapter outputs only")


def test_progress_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redirected stderr gets no bar frames; on a terminal an error starts on a line of its own."""
    args = merge_args(tmp_path, tiny_recipe("cat"))[:-1]  # no --quiet
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    monkeypatch.setattr("soupkit.io.progress.on_terminal", lambda: True)

    def fail(*_: object) -> None:
        raise SoupkitError("adapter 'math'", "readable tensors", "an injected failure mid-run")

    monkeypatch.setattr("soupkit.merge.write_sidecars", fail)
    result = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "out2")])
    assert result.exit_code == 2 and "merge (cat)" in result.stderr  # the bar was drawn
    assert result.stderr.endswith("\r\x1b[Kerror: adapter 'math': expected readable tensors, found an injected failure mid-run\n")


def test_analyze_shows_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from soupkit.analyze.run import analyze_recipe
    from soupkit.recipe.schema import Recipe

    monkeypatch.setattr("soupkit.io.progress.on_terminal", lambda: True)
    analyze_recipe(Recipe.from_dict(tiny_recipe("cat")), base_norms=False)
    err = capsys.readouterr().err
    assert "analyze: " in err and "layer" in err, err


def test_fit_micro_batch_that_cannot_fit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory estimate runs before the base model loads: 64 KiB free refuses a micro-batch of 2 tiny examples."""
    monkeypatch.setattr("soupkit.execute.available_memory", lambda device="cpu": 2**16)
    args = fit_case(b'{"text": "hello world"}\n' * 20, "--batch-size", "2")(tmp_path)
    before = tree_hashes(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (
        result.stderr.splitlines() == [result.stderr.strip()]
        and "--batch-size 2: expected a micro-batch within the 0.1 MiB available" in result.stderr
    )
    assert tree_hashes(tmp_path) == before and not (tmp_path / "out").exists()


def test_fit_micro_batch_estimate_by_hand() -> None:
    """34 b s h values of 2 bytes per layer (Korthikanti et al. 2022) + 3 float32 copies of the logits + weights."""
    from soupkit.fit.checks import micro_batch_bytes

    config = {"hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256}
    b, s, weights = 8, 512, 16 * 10**9
    expected = weights + 32 * 34 * b * s * 4096 + 3 * b * s * 128256 * 4
    assert micro_batch_bytes(config, weights, s, b, False, 2) == expected
    checkpointed = weights + 32 * 2 * b * s * 4096 * 2 + 34 * b * s * 4096 + 3 * b * s * 128256 * 4
    assert micro_batch_bytes(config, weights, s, b, True, 2) == checkpointed


def test_fit_doubtful_options_warn_and_never_repeat_examples(tmp_path: Path) -> None:
    """--eval-data equal to --data, and a micro-batch larger than the data (filled by repeats before)."""
    data = str(TINY / "calib.jsonl")
    args = fit_case()(tmp_path)
    args[args.index("--data") + 1] = data
    args += ["--eval-data", data, "--batch-size", "1000", "--steps", "1"]
    run_warned(tmp_path, args, "--eval-data is --data", "--batch-size 1000: only 32 training examples")
    report = json.loads((tmp_path / "out-report" / "fit_report.json").read_text())
    assert report["options"]["batch_size"] == 32 and report["options"]["steps"] == 1


def test_fit_that_makes_things_worse_keeps_the_recipe_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example: the fitted weights score worse held out than the recipe's own (4.6114 against 4.6050)."""
    monkeypatch.setattr("soupkit.io.progress.on_terminal", lambda: True)  # and fit-alpha's training shows progress
    root = Path(__file__).parents[1]
    out = tmp_path / "fitted.yaml"
    args = ["fit-alpha", str(root / "recipes" / "cat.yaml"), "--data", str(TINY / "calib.jsonl"), "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "fit-alpha: " in result.stderr and "step" in result.stderr  # the bar
    assert "no better on held-out data than the recipe weights" in result.stderr
    assert "weights written: recipe" in result.stdout
    report = json.loads((tmp_path / "fitted-report" / "fit_report.json").read_text())
    assert report["chosen_weights"] == "recipe" and report["heldout_loss"]["fitted"] >= report["heldout_loss"]["recipe"]
    fitted = {m["match"]: m["weights"] for m in yaml.safe_load(out.read_text())["merge"]["modules"]}
    # recipes/cat.yaml: math 0.6, code [0.2, 0.6] over the 2 layers; '*.mlp.*' math 0.8 code 0.2
    assert fitted["model.layers.0.mlp.up_proj"] == pytest.approx({"math": 0.8, "code": 0.2})
    assert fitted["model.layers.0.self_attn.q_proj"] == pytest.approx({"math": 0.6, "code": 0.2})
    assert fitted["model.layers.1.self_attn.v_proj"] == pytest.approx({"math": 0.6, "code": 0.6})


def test_local_copy_of_a_hub_base_is_recorded_by_its_hub_id(tmp_path: Path) -> None:
    """Adapters trained on `org/name`, merged against a local copy: the output names `org/name`, not a bare
    absolute path that breaks once the folder moves; the card says how to point PEFT at a moved base."""
    recipe = with_math(tmp_path)
    code = adapter_copy(tmp_path, "code")
    recipe["adapters"][1]["path"] = str(code)
    for adapter in (adapter_copy(tmp_path), code):
        edit_config(adapter, base_model_name_or_path="tiny-org/tiny-llama")
    result = CliRunner().invoke(main, merge_args(tmp_path, recipe))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/tiny-llama" and config["revision"] is None
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: tiny-org/tiny-llama" in card and "## Base model" in card
    assert "PeftModel.from_pretrained(base, PATH)" in card and f"merged against `{TINY / 'base'}`" in card


def test_lorahub_reports_no_zero_speed(tmp_path: Path) -> None:
    """LoraHub trains nothing: fit-alpha printed '0 tokens/s'; now it prints no speed, and names the weights written."""
    args = fit_case(b'{"text": "hello world, more text here"}\n' * 6, "--search", "lorahub", "--budget", "2")(tmp_path)
    result = CliRunner().invoke(main, [*args, "--lorahub-examples", "1"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" not in result.stdout and "weights written: " in result.stdout, result.stdout
    report = json.loads((tmp_path / "out-report" / "fit_report.json").read_text())
    assert report["chosen_weights"] in ("fitted", "recipe") and report["tokens_per_s"] is None
