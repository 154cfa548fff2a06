"""One home per method, each with its server half (strategy, runner) and its client half
(handlers, losses); ``fedapps/registry.py`` lists them. docs/architecture.md shows how to add
one."""
