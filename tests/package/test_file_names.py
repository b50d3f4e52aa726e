"""No two files of one name doing different jobs (docs/architecture.md, "Names"): a basename in
megatron_gem/ or tools/ is used once, except the names below, where every file does the same job
for its own room or engine (as torchtitan's per-model ``model.py``); each entry says why. A new
file of a taken name either gets a name saying its job or an entry here with its reason."""

import os
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Python's own names, in any package.
PYTHON_NAMES = {"__init__.py", "__main__.py"}

# name -> (the files that may share it, why they do the same job)
SHARED = {
    "cli.py": (
        {"megatron_gem/cli.py", "megatron_gem/serve/cli.py", "megatron_gem/integrations/vllm_plugin/cli.py"},
        "the command line of one program each: megatron-gem, megatron-gem serve, the vLLM plugin's serve",
    ),
    "main.py": ({"megatron_gem/training/main.py", "tools/gpu_check/main.py"}, "the main of one program each: train.py, tools/gpu_check.py"),
    "config.py": (
        {"megatron_gem/gem/config.py", "megatron_gem/training/config.py", "megatron_gem/serve/config.py"},
        "the settings dataclass of one room each: GEMConfig, JobConfig, ServeConfig",
    ),
    "model.py": (
        {"megatron_gem/hf/model.py", "megatron_gem/integrations/vllm_plugin/model.py"},
        "the GEM model for one framework each: HF transformers, vLLM",
    ),
    "summary.py": (
        {"megatron_gem/hf/summary.py", "megatron_gem/mcore/summary.py"},
        "summary mode on one engine's model each: HF transformers, megatron-core",
    ),
}


def basenames(tops=("megatron_gem", "tools")) -> dict[str, list[str]]:
    found = defaultdict(list)
    for top in tops:
        for dirpath, dirnames, names in os.walk(os.path.join(REPO, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in names:
                if name.endswith(".py"):
                    found[name].append(os.path.relpath(os.path.join(dirpath, name), REPO))
    return found


def test_no_two_files_of_one_name_for_different_jobs():
    repeated = {}
    for name, paths in basenames().items():
        if len(paths) > 1 and name not in PYTHON_NAMES:
            unexplained = set(paths) - SHARED.get(name, (set(), ""))[0]
            if unexplained:
                repeated[name] = sorted(paths)
    assert not repeated, "give each a name that says its job, or add the name to SHARED with the reason:\n" + "\n".join(
        f"  {name}: {', '.join(paths)}" for name, paths in sorted(repeated.items())
    )


def test_every_shared_name_is_still_shared():
    # an entry whose files were renamed away would let a new, unrelated file take the name unseen
    found = basenames()
    stale = [name for name, (paths, _) in SHARED.items() if len(paths & set(found[name])) < 2]
    assert not stale, f"no longer shared, remove from SHARED: {stale}"
