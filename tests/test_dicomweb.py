"""DICOMweb on the node's HTTP server, tried with the real client dicomweb-client and DCMTK findscu.

One node (listen role, web server on a free loopback port) holds the C-STORE'd test population and a CT
series stored over STOW-RS; the tests search it (QIDO-RS, compared with C-FIND of the same keys),
retrieve it (WADO-RS bytes, metadata, frames), store into it and refuse what it must.
"""

from __future__ import annotations

import base64
import re
from io import BytesIO

import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless
from requests import HTTPError

from builders import encoded, findscu, make_ct_series, population, store_population, study_uids
from peers import wait_until
from storage.users import create_token
from webnode import PASSWORDS, base_url, web_node

pytestmark = pytest.mark.peers


def _basic(name: str) -> dict[str, str]:
    token = base64.b64encode(f"{name}:{PASSWORDS[name]}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def _client(node, name: str = "olga") -> DICOMwebClient:  # noqa: ANN001
    session = create_session_from_user_pass(name, PASSWORDS[name])
    return DICOMwebClient(url=base_url(node) + "/dicom-web", session=session)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    work = tmp_path_factory.mktemp("dicomweb")
    with web_node(work / "node", pipeline={"quiet_seconds": 0.5}) as node:
        specs = population()
        store_population(node.port, specs)
        ct = sorted(make_ct_series(seed=7, slices=4), key=lambda ds: int(ds.InstanceNumber))
        stored = _client(node).store_instances(ct)
        assert len(stored.ReferencedSOPSequence) == 4
        yield node, specs, ct, work


# -- auth ---------------------------------------------------------------------------------------------
def test_no_dicomweb_request_is_answered_without_a_user(web) -> None:  # noqa: ANN001
    node, specs, ct, _ = web
    study = specs[0].study_uid
    with httpx.Client(base_url=base_url(node) + "/dicom-web") as http:
        (mount,) = [r for r in node.web.app.routes if getattr(r, "path", "") == "/dicom-web"]
        for route in mount.routes:
            path = re.sub(r"\{[^}]+\}", "1", route.path.replace("{study}", study))
            for method in route.methods - {"HEAD"}:
                assert http.request(method, path).status_code == 401, (method, path)
        wrong = base64.b64encode(b"olga:not-her-password").decode()
        assert http.get("/studies", headers={"authorization": f"Basic {wrong}"}).status_code == 401
        assert http.get("/studies", headers={"authorization": "Bearer hn_not-a-token"}).status_code == 401
        assert http.get("/studies", headers=_basic("vic")).status_code == 200
        token = create_token(node.index, "vic", "dicomweb test")
        answer = http.get("/studies", headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+json"
        # a viewer searches and retrieves but does not store
        body, boundary = _multipart([encoded(ct[0])])
        refused = http.post("/studies", content=body, headers={**_basic("vic"), "content-type": _stow_type(boundary)})
        assert refused.status_code == 403


# -- QIDO-RS ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "filters, expected",
    [
        ({"PatientName": "doe*"}, {0, 2}),  # PN wildcard, case-insensitive as C-FIND
        ({"StudyDate": "20240110-20240228"}, {0}),  # date range
        ({"StudyDate": "-20231231"}, {3}),  # open range
        ({"00100020": "P2"}, {2}),  # attribute by tag
        ({"AccessionNumber": "ACC?"}, {0, 2, 3, "ct"}),  # ? wildcard
        ({"ModalitiesInStudy": "MR"}, {0}),
    ],
)
def test_qido_studies_match_as_c_find_does(web, filters: dict, expected: set) -> None:  # noqa: ANN001
    node, specs, ct, work = web
    found = {ds.StudyInstanceUID for ds in map(_dataset, _client(node).search_for_studies(search_filters=filters))}
    assert found == {ct[0].StudyInstanceUID if i == "ct" else specs[i].study_uid for i in expected}
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"] + [
        f"{'(0010,0020)' if k == '00100020' else k}={v}" for k, v in filters.items()
    ]
    assert study_uids(findscu(node.port, work / "find", keys)) == found


def test_qido_uid_lists_paging_and_fields(web) -> None:  # noqa: ANN001
    node, specs, ct, _ = web
    client = _client(node)
    a, c = specs[0].study_uid, specs[3].study_uid
    listed = client.search_for_studies(search_filters={"StudyInstanceUID": f"{a},{c}"})
    assert {_dataset(d).StudyInstanceUID for d in listed} == {a, c}
    everything = [_dataset(d).StudyInstanceUID for d in client.search_for_studies()]
    assert len(everything) == 4  # three C-STORE'd studies and the STOW-RS one
    paged = [_dataset(d).StudyInstanceUID for d in client.search_for_studies(limit=2, offset=1)]
    assert paged == everything[1:3]
    study = _dataset(client.search_for_studies(search_filters={"StudyInstanceUID": a})[0])
    assert study.NumberOfStudyRelatedSeries == 2 and study.NumberOfStudyRelatedInstances == 5
    assert study.RetrieveURL.endswith(f"/dicom-web/studies/{a}")
    # includefield adds return keys the defaults lack
    plain = client.search_for_series(a)[0]
    wider = client.search_for_series(a, fields=["BodyPartExamined", "00080070"])[0]
    assert "00180015" not in plain and "00180015" in wider and "00080070" in wider
    with httpx.Client(base_url=base_url(node) + "/dicom-web", headers=_basic("vic")) as http:
        fuzzy = http.get("/studies", params={"PatientName": "doe", "fuzzymatching": "true"})
        assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["warning"]
        assert fuzzy.json() == []  # literal matching: no study is named just "doe"
        assert http.get("/studies", params={"NoSuchAttribute": "x"}).status_code == 400
        assert http.get("/studies", params={"StudyDate": "2024-01-01"}).status_code == 400
        assert http.get("/studies", params={"limit": "many"}).status_code == 400


def test_qido_series_and_instances(web) -> None:  # noqa: ANN001
    node, specs, ct, _ = web
    client = _client(node)
    series = [_dataset(d) for d in client.search_for_series(specs[0].study_uid)]
    assert sorted(s.Modality for s in series) == ["CT", "MR"]
    mr = [_dataset(d) for d in client.search_for_series(search_filters={"Modality": "MR"})]
    assert [s.SeriesInstanceUID for s in mr] == [specs[1].series_uid]
    instances = client.search_for_instances(ct[0].StudyInstanceUID, ct[0].SeriesInstanceUID)
    assert sorted(_dataset(d).SOPInstanceUID for d in instances) == sorted(d.SOPInstanceUID for d in ct)
    one = client.search_for_instances(search_filters={"SOPInstanceUID": ct[2].SOPInstanceUID})
    assert [_dataset(d).InstanceNumber for d in one] == [3]


# -- WADO-RS ------------------------------------------------------------------------------------------
def test_wado_sends_the_stored_bytes(web) -> None:  # noqa: ANN001
    node, _, ct, _ = web
    client = _client(node)
    first = ct[0]
    got = client.retrieve_instance(
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
        media_types=(("application/dicom", "*"),),
    )
    assert got.SOPInstanceUID == first.SOPInstanceUID and got.PixelData == first.PixelData
    series = client.retrieve_series(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert [d.InstanceNumber for d in series] == [1, 2, 3, 4]
    # the file as stored: the dataset bytes exactly as uploaded, behind the C-STORE SCP's file meta
    row = node.index.query("SELECT path FROM instances WHERE sop_instance_uid = ?", (str(first.SOPInstanceUID),))
    data = node.files.abspath(row[0]["path"]).read_bytes()
    sent = BytesIO()
    dcmwrite(sent, first)  # what dicomweb-client posted
    assert data.endswith(sent.getvalue()[_meta_length(sent.getvalue()) :])
    url = f"/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}"
    with httpx.Client(base_url=base_url(node) + "/dicom-web", headers=_basic("vic")) as http:
        bare = http.get(url, headers={"accept": "application/dicom; transfer-syntax=*"})
        assert bare.status_code == 200 and bare.content == data
        compressed = http.get(
            url, headers={"accept": f'multipart/related; type="application/dicom"; transfer-syntax={RLELossless}'}
        )
        assert compressed.status_code == 200
        assert http.get(url, headers={"accept": "image/png"}).status_code == 406
        assert http.get(url.replace(str(first.SOPInstanceUID), "1.2.3.4")).status_code == 404
        assert http.get(url.replace(str(first.SOPInstanceUID), "not-a-uid")).status_code == 400
    rle = client.retrieve_instance(
        first.StudyInstanceUID,
        first.SeriesInstanceUID,
        first.SOPInstanceUID,
        media_types=(("application/dicom", str(RLELossless)),),
    )
    assert rle.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(rle.pixel_array, first.pixel_array)


def test_wado_metadata_and_frames(web) -> None:  # noqa: ANN001
    node, _, ct, _ = web
    client = _client(node)
    first = ct[0]
    meta = client.retrieve_series_metadata(first.StudyInstanceUID, first.SeriesInstanceUID)
    assert len(meta) == 4
    one = _dataset({k: v for k, v in meta[0].items() if k != "7FE00010"})
    assert one.PatientID == first.PatientID and one.Rows == first.Rows
    assert meta[0]["7FE00010"]["BulkDataURI"].endswith("/bulk/7FE00010")
    frames = client.retrieve_instance_frames(
        first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID, frame_numbers=[1]
    )
    assert frames == [first.PixelData]
    bulk = client.retrieve_bulkdata(meta[0]["7FE00010"]["BulkDataURI"])
    assert bulk == [first.PixelData]
    with httpx.Client(base_url=base_url(node) + "/dicom-web", headers=_basic("vic")) as http:
        url = f"/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}"
        assert http.get(url + "/frames/2").status_code == 404
        assert http.get(url + "/frames/zero").status_code == 400


# -- STOW-RS ------------------------------------------------------------------------------------------
def test_stow_series_is_found_by_qido_and_by_findscu_and_completes(web) -> None:  # noqa: ANN001
    node, _, ct, work = web
    study = str(ct[0].StudyInstanceUID)
    assert [
        d.StudyInstanceUID
        for d in findscu(
            node.port,
            work / "find-stow",
            ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "SeriesInstanceUID"],
        )
    ] == [study]
    rows = node.index.query("SELECT calling_ae FROM instances WHERE study_instance_uid = ?", (study,))
    assert {r["calling_ae"] for r in rows} == {"dicomweb:olga"}
    # indexed as received: the series watcher completes the series for the pipeline
    wait_until(
        lambda: node.index.series(str(ct[0].SeriesInstanceUID))["state"] != "receiving",
        timeout=10,
        what="STOW-RS series completed",
    )


def test_stow_refuses_a_bad_upload_and_quarantines_it(web) -> None:  # noqa: ANN001
    node, specs, ct, _ = web
    good = make_ct_series(seed=9, slices=2)
    truncated = bytearray(encoded(good[1]))
    del truncated[-100:]  # pixel data shorter than the image attributes need
    before = len(node.files.quarantined())
    with httpx.Client(base_url=base_url(node) + "/dicom-web", headers=_basic("olga")) as http:
        body, boundary = _multipart([encoded(good[0]), bytes(truncated)])
        answer = http.post("/studies", content=body, headers={"content-type": _stow_type(boundary)})
        assert answer.status_code == 202
        failed = _dataset(answer.json()).FailedSOPSequence
        assert [int(f.FailureReason) & 0xF000 for f in failed] == [0xC000]
        assert failed[0].ReferencedSOPInstanceUID == good[1].SOPInstanceUID
        # every part refused: 409; a part that is not DICOM at all
        body, boundary = _multipart([b"not dicom at all"])
        assert http.post("/studies", content=body, headers={"content-type": _stow_type(boundary)}).status_code == 409
        # an instance of another study than the request's
        body, boundary = _multipart([encoded(make_ct_series(seed=10, slices=1)[0])])
        other = http.post(
            f"/studies/{specs[0].study_uid}", content=body, headers={"content-type": _stow_type(boundary)}
        )
        assert other.status_code == 409
        assert int(_dataset(other.json()).FailedSOPSequence[0].FailureReason) == 0xA900
        # wrong media type, broken multipart
        assert http.post("/studies", content=b"x", headers={"content-type": "application/dicom"}).status_code == 415
        assert http.post("/studies", content=b"x", headers={"content-type": _stow_type("b0")}).status_code == 400
        assert http.get("/studies").status_code == 200  # the node keeps serving
    quarantined = node.files.quarantined()[before:]
    assert len(quarantined) == 3
    with pytest.raises(HTTPError) as refused:
        _client(node).store_instances([dcmread(BytesIO(encoded(good[0])))], study_instance_uid=specs[0].study_uid)
    assert refused.value.response.status_code == 409


# -- helpers ------------------------------------------------------------------------------------------
def _dataset(body: dict) -> Dataset:
    return Dataset.from_json(body)


def _meta_length(data: bytes) -> int:
    """Where the dataset starts in pydicom's dcmwrite of a dataset (no preamble, file meta without group length)."""
    position = 0
    while data[position : position + 2] == b"\x02\x00":
        position += 8 + int.from_bytes(data[position + 6 : position + 8], "little")
    return position


def _multipart(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = "test-boundary-7d1"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return body + f"--{boundary}--\r\n".encode(), boundary


def _stow_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'
