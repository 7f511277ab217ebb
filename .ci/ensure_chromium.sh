#!/usr/bin/env bash
# The HTML report test drives a real headless Chromium; install Debian's package if it is missing.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
else
  echo "warning: chromium not found and cannot be installed here; the browser test will be skipped" >&2
fi
exit 0
