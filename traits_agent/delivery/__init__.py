"""Delivery: lanes batch each resource's queue, the uploader posts batches to the API under one
answer policy, rejected items go to dead letters, CSV files go through the spool."""
