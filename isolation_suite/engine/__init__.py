"""The engine: settings, the run plan, the search, the sweep, profiles and databases."""
