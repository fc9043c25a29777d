"""The API's harvested traffic as training data: `export` (SFT conversations, DPO pairs from
feedback and arena votes), `pii` (masking), `logs` (reading the request logs a batch at a time,
and purging them). The feedback itself arrives through the front door (`posttrain.serve.feedback`)."""
