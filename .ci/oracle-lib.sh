# Sourced by .ci/oracle-*.sh: install pinned packages --no-deps into a folder of their own,
# atomically (a temporary folder under .oracle/, renamed into place once checked), and do
# nothing when the folder already holds exactly what is wanted.
# The sourcing script sets NAME (for messages), PYTHON, TARGET, REQUIREMENTS and WANT (what
# .installed records), then calls oracle_up_to_date, oracle_install, its own additions to
# "$work" and checks, and oracle_finish.

oracle_up_to_date() {
    if [[ -f $TARGET/.installed && "$(cat "$TARGET/.installed")" == "$WANT" ]]; then
        echo "$NAME: $TARGET is up to date"
        return 0
    fi
    return 1
}

oracle_install() {
    mkdir -p .oracle
    work=$(mktemp -d .oracle/install.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$work" \
        "${REQUIREMENTS[@]}"
    # Console scripts and stray top-level `tests` packages are not needed.
    rm -rf "$work/bin" "$work/tests"
}

oracle_finish() {
    echo "$WANT" > "$work/.installed"
    rm -rf "$TARGET"
    mv "$work" "$TARGET"
    trap - EXIT
    echo "$NAME: installed $1 into $TARGET"
}
