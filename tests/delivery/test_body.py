"""The JSON body of a batch, assembled from stored documents (uploader.build_body)."""

from __future__ import annotations

import json

import pytest

from traits_agent.delivery.uploader import build_body
from traits_agent.schema import RESOURCES


@pytest.mark.parametrize("count", [0, 1, 2, 3, 1000])
@pytest.mark.parametrize("name", sorted(RESOURCES))
@pytest.mark.parametrize("playfab_arrays", [False, True])
def test_body_is_the_documents_in_their_wrapper(name, count, playfab_arrays):
    resource = RESOURCES[name]
    docs = [{"n": i, "s": "é,[]{}"} for i in range(count)]
    payloads = [json.dumps(d, ensure_ascii=False).encode() for d in docs]
    body = json.loads(build_body(resource, payloads, playfab_arrays))
    if resource.payload_key is None and not playfab_arrays and count == 1:
        assert body == docs[0]  # PlayFab's webhook shape: the event object itself
    elif resource.payload_key is None:
        assert body == docs
    else:
        assert body == {resource.payload_key: docs}


def test_body_does_not_change_the_payloads():
    payloads = [b'{"a":1}', b'{"a":2}', b'{"a":3}']
    kept = list(payloads)
    build_body(RESOURCES["actions"], payloads)
    assert payloads == kept
