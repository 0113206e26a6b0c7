"""Agent-style load: the session model, streaming measurements, and the Locust users that play it."""
