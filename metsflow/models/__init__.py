"""Models: networks, training, inference, the cascade's second stage and post-processing."""
