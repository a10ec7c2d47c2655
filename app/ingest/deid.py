"""DICOM de-identification: DICOM PS3.15 Annex E, Basic Application Level Confidentiality
Profile, with the Retain Longitudinal Temporal Information with Modified Dates option.

dicognito does the replacing: person names, patient and accession ids, addresses,
institution, UIDs (the same original UID always maps to the same new one for one seed),
dates and times shifted by one offset per seed. On top of it, what dicognito leaves that
the basic profile removes: private tags, curves and overlays, free text (comments,
descriptions, reports), AE titles, the other attributes listed below, and the birth date.
The seed is per tenant (tenant_seed), so one tenant's studies stay linked across uploads
while the same study uploaded by two tenants gets unrelated UIDs.

A file whose header says its pixels carry burned-in annotation (BurnedInAnnotation YES)
is refused: header de-identification cannot remove text drawn into the image.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Iterator
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicognito.element_anonymizer import ElementAnonymizer
    from pydicom import DataElement, Dataset

PROFILE = "PS3.15 Annex E basic"
TOOL = f"dicognito {version('dicognito')}"
METHOD: dict[str, str] = {"profile": PROFILE, "tool": TOOL}
# PS3.16 CID 7050 "De-identification Method": the profile and the option applied.
_METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
_METHOD_TEXT = f"{PROFILE} ({TOOL})"

# Annex E table E.1-1 attributes marked X (remove) that dicognito neither removes nor
# replaces; private tags, curves, overlays, free text and AE titles go whatever their name.
_REMOVE = (
    "AcquisitionComments",
    "AcquisitionContextSequence",
    "AcquisitionDeviceProcessingDescription",
    "ActualHumanPerformersSequence",
    "AdditionalPatientHistory",
    "AdmissionID",
    "AdmittingDiagnosesCodeSequence",
    "AdmittingDiagnosesDescription",
    "Allergies",
    "CommentsOnThePerformedProcedureStep",
    "ConfidentialityConstraintOnPatientDataDescription",
    "ContentCreatorIdentificationCodeSequence",
    "ContributionDescription",
    "CustodialOrganizationSequence",
    "DerivationDescription",
    "DeviceSerialNumber",
    "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription",
    "EthnicGroup",
    "IconImageSequence",
    "ImageComments",
    "InstitutionCodeSequence",
    "InsurancePlanIdentification",
    "IssuerOfAdmissionID",
    "IssuerOfPatientID",
    "MedicalAlerts",
    "ModifiedAttributesSequence",
    "OperatorIdentificationSequence",
    "OrderCallbackPhoneNumber",
    "OrderEnteredBy",
    "OrderEntererLocation",
    "OriginalAttributesSequence",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientAge",
    "PatientBirthName",
    "PatientBirthTime",
    "PatientComments",
    "PatientMotherBirthName",
    "PatientSize",
    "PatientState",
    "PatientTransportArrangements",
    "PatientWeight",
    "PerformedLocation",
    "PerformedProcedureStepDescription",
    "PerformingPhysicianIdentificationSequence",
    "PersonAddress",
    "PersonTelephoneNumbers",
    "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence",
    "PreMedication",
    "ProtocolName",
    "ReasonForStudy",
    "ReasonForTheRequestedProcedure",
    "ReferencedPatientAliasSequence",
    "ReferencedPatientSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianIdentificationSequence",
    "ReferringPhysicianTelephoneNumbers",
    "RequestAttributesSequence",
    "RequestedContrastAgent",
    "RequestedProcedureComments",
    "RequestedProcedureDescription",
    "RequestedProcedureLocation",
    "ResultsComments",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepLocation",
    "SeriesDescription",
    "ServiceEpisodeDescription",
    "ServiceEpisodeID",
    "SmokingStatus",
    "SpecialNeeds",
    "StudyComments",
    "StudyDescription",
    "TextComments",
    "TextString",
    "VisitComments",
)
# Kept with an empty value (Annex E action Z on a type 2 attribute).
_EMPTY = ("PatientBirthDate", "PatientSex")
# free text (comments, reports, descriptions) and application entity titles (stations)
_REMOVED_VRS = frozenset({"LT", "ST", "UT", "UC", "AE"})
_OVERLAY_ELEMENTS = (0x3000, 0x4000)  # Overlay Data and Comments: may draw or spell the name
_FIRST_GROUPS = (b"\x02\x00", b"\x08\x00")


class NotDeidentifiable(ValueError):
    """A DICOM file that cannot be de-identified (unreadable, or burned-in annotation)."""


def tenant_seed(secret_key: str, tenant_id: int) -> str:
    """The de-identification seed of one tenant: an HMAC of its id under the server's secret
    key, so nobody without that key can recompute the UID mapping from public data."""
    if not secret_key:
        raise ValueError("a secret key is needed to derive the tenant's de-identification seed")
    return hmac.new(secret_key.encode(), f"medmaas dicom-deid tenant {tenant_id}".encode(), hashlib.sha256).hexdigest()


def is_dicom(head: bytes, name: str = "") -> bool:
    """DICOM by its 'DICM' marker after the 128-byte preamble, by a .dcm/.dicom name, or
    for a file without the preamble by its first tag (group 0002 or 0008, little endian)."""
    return head[128:132] == b"DICM" or head[:2] in _FIRST_GROUPS or name.lower().endswith((".dcm", ".dicom"))


class Deidentifier:
    """De-identifies DICOM datasets or files with one seed (one tenant). seed=None: a random
    seed, so nothing links to another upload."""

    def __init__(self, seed: str | None) -> None:
        from dicognito.anonymizer import Anonymizer

        self._anonymizer = Anonymizer(seed=seed)
        # runs before dicognito's handlers; the first handler that takes an element wins
        self._anonymizer.add_element_handler(_basic_profile_remover())

    def dataset(self, ds: Dataset) -> None:
        """De-identify a dataset in place; NotDeidentifiable for burned-in annotation."""
        from pydicom import Dataset

        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise NotDeidentifiable("burned-in annotation (the pixels may show patient identity)")
        self._anonymizer.anonymize(ds)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = _METHOD_TEXT
        codes = []
        for value, meaning in _METHOD_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        ds.DeidentificationMethodCodeSequence = codes

    def file(self, raw: bytes) -> tuple[bytes, Dataset]:
        """A DICOM file's de-identified bytes (with the preamble when it had one) and its
        de-identified header."""
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(raw), force=raw[128:132] != b"DICM")
        except Exception as exc:  # pydicom raises many types on garbage
            raise NotDeidentifiable(f"not a readable DICOM file ({_kind(exc)})") from None
        try:
            self.dataset(ds)
        except NotDeidentifiable:
            raise
        except Exception as exc:  # elements are parsed lazily, so garbage often fails only here
            raise NotDeidentifiable(f"not a readable DICOM file ({_kind(exc)})") from None
        out = io.BytesIO()
        try:
            ds.save_as(out, enforce_file_format=bool(ds.preamble))
        except Exception as exc:
            raise NotDeidentifiable(f"DICOM file cannot be rewritten ({_kind(exc)})") from None
        return out.getvalue(), ds


def _basic_profile_remover() -> ElementAnonymizer:
    """A dicognito element handler for what the basic profile removes and dicognito keeps."""
    from dicognito.element_anonymizer import ElementAnonymizer
    from pydicom.datadict import tag_for_keyword

    remove = frozenset(tag_for_keyword(k) for k in _REMOVE)
    empty = frozenset(tag_for_keyword(k) for k in _EMPTY)

    class BasicProfileRemover(ElementAnonymizer):
        def __call__(self, dataset: Dataset, data_element: DataElement) -> bool:
            tag = data_element.tag
            if tag in empty:  # Tag is an int: set membership is a hash look-up
                data_element.value = ""
                return True
            if (
                tag in remove
                or tag.is_private
                or data_element.VR in _REMOVED_VRS
                or tag.group & 0xFF00 == 0x5000  # curves
                or (tag.group & 0xFF00 == 0x6000 and tag.element in _OVERLAY_ELEMENTS)
            ):
                del dataset[tag]
                return True
            return False

        def describe_actions(self) -> Iterator[str]:
            yield f"Remove {', '.join(_REMOVE)}"
            yield f"Empty {', '.join(_EMPTY)}"
            yield "Remove private tags, curves, overlay data and comments, free text (LT, ST, UT, UC) and AE titles"

    return BasicProfileRemover()


def identifiers(ds: Dataset) -> dict[str, Any]:
    """The de-identified ids that link files of one patient, study and series."""
    return {
        "patient_id": str(ds.get("PatientID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_uid": str(ds.get("SOPInstanceUID", "")),
    }


def _kind(exc: Exception) -> str:
    # pydicom's messages quote values (and garbage read as tags), which may be identifiers:
    # reports name the kind of failure only.
    return type(exc).__name__
