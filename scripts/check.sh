#!/usr/bin/env bash
# Every static check, in one command (`make check`). Runs them all, then exits 1 naming the ones
# that failed. Tools come from the project venv (VENV_BIN, default .venv/bin).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
BIN=${VENV_BIN:-.venv/bin}

for tool in ruff mypy buf python; do
    [[ -x $BIN/$tool ]] || {
        echo "check: $BIN/$tool not found; run: make install" >&2
        exit 2
    }
done

failed=()

run() { # name command...
    local name=$1
    shift
    echo "==> $name"
    if ! "$@"; then
        failed+=("$name")
    fi
}

# The git input buf compares against: the local main branch, else origin/main (CI clones often
# check out a detached commit), by commit so buf can fetch it. Empty if neither has proto/.
# In a linked worktree .git is a file, so buf reads the repository's common directory instead.
breaking_baseline() {
    local git_dir ref commit
    git_dir=$(git rev-parse --path-format=relative --git-common-dir 2>/dev/null) || return 0
    for ref in refs/heads/main refs/remotes/origin/main; do
        commit=$(git rev-parse --quiet --verify "$ref^{commit}" 2>/dev/null) || continue
        if git cat-file -e "$commit:proto" 2>/dev/null; then
            if [[ $ref == refs/heads/main ]]; then
                echo "$git_dir#branch=main"
            else
                echo "$git_dir#ref=$commit"
            fi
            return 0
        fi
    done
}

run "ruff check" "$BIN/ruff" check .
run "ruff format" "$BIN/ruff" format --check .
run mypy "$BIN/mypy"
run "buf lint" "$BIN/buf" lint

baseline=$(breaking_baseline)
if [[ -n $baseline ]]; then
    run "buf breaking (against $baseline)" "$BIN/buf" breaking --against "$baseline"
else
    echo "==> buf breaking: skipped (no main branch with proto/ to compare against)"
fi

run "generated code" "$BIN/python" scripts/gen_protos.py --check
run "configuration reference" "$BIN/python" scripts/gen_config_reference.py --check

if command -v shellcheck >/dev/null; then
    run shellcheck shellcheck scripts/*.sh .ci/run
else
    echo "==> shellcheck: skipped (not installed)"
fi

if ((${#failed[@]})); then
    echo "check: ${#failed[@]} failed:" >&2
    printf '  - %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "check: all passed"
