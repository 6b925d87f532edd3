"""Prometheus metrics on `--metrics-listen`: per-VM counters from the driver, and the agent's own.

`vms` turns VM samples into exposition text (pure), `agent` holds the agent's own,
`scrape` gathers one snapshot without blocking the loop and renders it, `http` serves it.
"""

from agent.metrics.agent import AgentMetrics
from agent.metrics.http import MetricsServer
from agent.metrics.scrape import Scraper

__all__ = ["AgentMetrics", "MetricsServer", "Scraper"]
