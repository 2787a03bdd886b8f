"""Backbone steering methods: how a steering vector is computed from data."""
