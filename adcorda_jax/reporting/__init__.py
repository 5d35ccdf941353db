"""Run outputs for people and machines: metrics logs, Markdown reports and plots."""
