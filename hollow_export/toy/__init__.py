"""The toy world: captioned 128 px photos to pretrain the embedded pipeline on, subjects, and an offline judge."""
