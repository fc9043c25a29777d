"""posttrain: an appliance that turns an open-weight base model into a served, evaluated,
continuously improved assistant."""

__version__ = "0.1.0"
