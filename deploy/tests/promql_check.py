#!/usr/bin/env python3
"""Checks every PromQL expression of Orchard's Grafana dashboard and alert rules against a
live Prometheus: each must parse, evaluate and return data (a non-empty result).

Alert expressions must have the shape `<quantity> <comparison> <number>` (as in
deploy/prometheus/alerts.yml): the whole expression must evaluate (it is usually empty while
the alert is not firing) and the quantity must return data, so a renamed metric cannot hide
behind a quiet alert. Grafana's interval variables ($__rate_interval, $__interval, $__range)
are replaced by --interval; any other `$variable` is reported as a failure.

With --check-loaded-rules the rules must also be loaded in that Prometheus and evaluate
without error (prometheus_check.sh loads them).

Exit status: 0 when every expression passes, 1 when any fails (each failure is listed), 2 on
bad usage or an unreachable Prometheus.

    deploy/tests/promql_check.py --prometheus http://127.0.0.1:9090
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEPLOY = Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARD = DEPLOY / "grafana" / "dashboards" / "orchard.json"
DEFAULT_RULES = DEPLOY / "prometheus" / "alerts.yml"

GRAFANA_INTERVALS = ("$__rate_interval", "$__interval", "$__range")
TEMPLATE_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*")
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
THRESHOLD = re.compile(rf"^(?P<quantity>.*\S)\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?{NUMBER}\s*$", re.S)


@dataclass
class Expression:
    """One PromQL expression and where it came from."""

    origin: str
    expr: str
    is_alert: bool = False


def dashboard_expressions(path: Path) -> list[Expression]:
    """Every `targets[].expr` of every panel, rows' nested panels included."""
    found: list[Expression] = []

    def walk(panels: list, dashboard: str) -> None:
        for panel in panels:
            title = panel.get("title", "?")
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if expr:
                    origin = f"{dashboard} / {title} / {target.get('refId', '?')}"
                    found.append(Expression(origin, expr))
            walk(panel.get("panels", []), dashboard)

    dashboard = json.loads(path.read_text())
    walk(dashboard.get("panels", []), path.name)
    return found


def rule_expressions(path: Path) -> list[Expression]:
    """Every alerting and recording rule expression of a Prometheus rule file."""
    try:
        import yaml  # PyYAML; only needed for rule files
    except ImportError:
        sys.exit("promql_check: reading rule files needs PyYAML (pip install pyyaml)")
    found = []
    for group in yaml.safe_load(path.read_text()).get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record") or "?"
            origin = f"{path.name} / {group.get('name', '?')} / {name}"
            found.append(Expression(origin, str(rule["expr"]), is_alert="alert" in rule))
    return found


class Prometheus:
    """The few Prometheus HTTP API calls the check needs."""

    def __init__(self, base_url: str, timeout: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, params: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as e:
            # 400/422 carry a JSON body with Prometheus' error (e.g. a parse error).
            try:
                return json.load(e)
            except ValueError:
                return {"status": "error", "error": f"HTTP {e.code}"}

    def query(self, expr: str) -> tuple[list | None, str | None]:
        """(result, None) on success, (None, error message) otherwise."""
        body = self.get("/api/v1/query", {"query": expr})
        if body.get("status") != "success":
            return None, f"{body.get('errorType', 'error')}: {body.get('error', body)}"
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [data["result"]], None
        return data["result"], None


def substitute_intervals(expr: str, interval: str) -> tuple[str, str | None]:
    for variable in GRAFANA_INTERVALS:
        expr = expr.replace(variable, interval)
    unknown = TEMPLATE_VARIABLE.search(expr)
    if unknown:
        return expr, f"unknown template variable {unknown.group(0)}"
    return expr, None


def check_expression(prom: Prometheus, item: Expression, interval: str) -> str | None:
    """None when the expression passes, else why it fails."""
    expr, problem = substitute_intervals(item.expr, interval)
    if problem:
        return problem
    result, error = prom.query(expr)
    if error:
        return error
    if not item.is_alert:
        return None if result else "returned no data"
    shape = THRESHOLD.match(expr)
    if not shape:
        return "alert expression is not `<quantity> <comparison> <number>`"
    quantity = shape.group("quantity")
    result, error = prom.query(quantity)
    if error:
        return f"quantity `{quantity}`: {error}"
    return None if result else f"quantity `{quantity}` returned no data"


def check_loaded_rules(prom: Prometheus, items: list[Expression], wait: float) -> list[str]:
    """Failures for rules missing from Prometheus or evaluating with an error."""
    wanted = {item.origin.rsplit(" / ", 1)[-1] for item in items if " / " in item.origin}
    deadline = time.monotonic() + wait
    while True:
        groups = prom.get("/api/v1/rules").get("data", {}).get("groups", [])
        loaded = {rule["name"]: rule for group in groups for rule in group.get("rules", [])}
        pending = [n for n in wanted if loaded.get(n, {}).get("health") in (None, "unknown")]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    failures = []
    for name in sorted(wanted):
        rule = loaded.get(name)
        if rule is None:
            failures.append(f"rule {name}: not loaded in Prometheus")
        elif rule.get("health") != "ok":
            failures.append(f"rule {name}: health {rule.get('health')} {rule.get('lastError', '')}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, action="append", help=f"dashboard JSON (default {DEFAULT_DASHBOARD})")
    parser.add_argument("--rules", type=Path, action="append", help=f"rule file (default {DEFAULT_RULES})")
    parser.add_argument("--interval", default="1m", help="value for $__rate_interval etc. (default 1m)")
    parser.add_argument("--check-loaded-rules", action="store_true", help="also require the rules to be loaded and healthy")
    parser.add_argument("--rules-wait", type=float, default=30.0, help="seconds to wait for a first rule evaluation")
    parser.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout per query, seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="print passing expressions too")
    args = parser.parse_args()

    prom = Prometheus(args.prometheus, args.timeout)
    try:
        prom.get("/api/v1/status/buildinfo")
    except (urllib.error.URLError, OSError) as e:
        print(f"promql_check: cannot reach Prometheus at {args.prometheus}: {e}", file=sys.stderr)
        return 2

    rule_items = [e for path in (args.rules or [DEFAULT_RULES]) for e in rule_expressions(path)]
    items = [e for path in (args.dashboard or [DEFAULT_DASHBOARD]) for e in dashboard_expressions(path)]
    items += rule_items
    failures = []
    for item in items:
        problem = check_expression(prom, item, args.interval)
        if problem:
            failures.append(f"{item.origin}: {problem}\n    {item.expr}")
        elif args.verbose:
            print(f"ok    {item.origin}")
    passed = len(items) - len(failures)
    if args.check_loaded_rules:
        failures += check_loaded_rules(prom, rule_items, args.rules_wait)

    for failure in failures:
        print(f"FAIL  {failure}")
    print(f"promql_check: {passed}/{len(items)} expressions returned data; {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
