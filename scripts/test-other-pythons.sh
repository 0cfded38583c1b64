#!/usr/bin/env bash
# Run the data-path tests (volume, keystore, NBD export with real clients, migration) under every other
# Python that pyproject's requires-python admits, each in its own venv (.venv-3.X) built from the interpreter
# the machine ships (python3.X on PATH, else pyenv's newest 3.X).  The default interpreter runs the whole
# suite (make test); these runs catch what differs between versions, e.g. asyncio transports that keep the
# buffers they are given from 3.12 on.  An interpreter that is missing is skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSIONS=(${QWAMOS_OTHER_PYTHONS:-3.12 3.13})
# The same hashed lock as the Makefile's venv (it covers 3.11-3.13), then the project without dependencies.
LOCK=requirements/ci.lock
DATA_PATH_TESTS=(tests/test_crypto.py tests/test_storage_rbd*.py tests/test_volume_*.py tests/test_keystore_*.py tests/test_nbd_*.py tests/test_migrate_*.py tests/test_key_rotate*.py tests/test_key_identity_switch.py tests/test_rotation_acceptance.py tests/test_backup.py tests/test_backup_tamper.py)
# Run under the default Python only: the kill -9 loops of RBD snapshot create/revert/merge (5 minutes of the
# set) test the order of librbd calls (renames, locks, header commits), which no Python version changes; the
# bytes those steps move are the data-path tests' above, which run here in full.
ONCE=(
    tests/test_volume_snapshots_rbd.py::test_kill_at_every_step_of_a_create_leaves_the_pre_or_post_state
    tests/test_volume_snapshots_rbd.py::test_kill_at_every_step_of_a_revert_leaves_the_pre_or_post_state
    tests/test_volume_snapshots_rbd.py::test_kill_at_every_step_of_a_merge_keeps_every_view
)

find_python() {
    local v=$1 cand
    if cand=$(command -v "python$v" 2>/dev/null) && "$cand" -c 'import venv' 2>/dev/null; then
        echo "$cand"
        return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        for cand in $(ls -d "$(pyenv root)/versions/$v".* 2>/dev/null | sort -V -r); do
            [[ -x $cand/bin/python$v ]] && { echo "$cand/bin/python$v"; return; }
        done
    fi
    return 1
}

status=0
for v in "${VERSIONS[@]}"; do
    if ! py=$(find_python "$v"); then
        echo "test-other-pythons: SKIPPED Python $v: no python$v on PATH and none under pyenv"
        continue
    fi
    venv=.venv-$v
    stamp=$venv/.installed.stamp
    if [[ ! -f $stamp || pyproject.toml -nt $stamp || $LOCK -nt $stamp || setup.py -nt $stamp ||
          src/qwamos/_aead_runs.c -nt $stamp ]]; then
        echo "test-other-pythons: building $venv from $py (packages from $LOCK)"
        [[ -x $venv/bin/python ]] || "$py" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --require-hashes -r "$LOCK"
        "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
        touch "$stamp"
    fi
    echo "test-other-pythons: data-path tests under $("$venv/bin/python" --version)"
    "$venv/bin/python" -m pytest -q -p no:cacheprovider "${DATA_PATH_TESTS[@]}" "${ONCE[@]/#/--deselect=}" || status=1
done
exit $status
