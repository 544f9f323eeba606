"""Read a FHIR R4 bundle into the same rows as the CSV files, one per resource.

Each entry is validated with the `fhir.resources` R4B models (R4B is the release of
fhir.resources 8 nearest to R4: Patient, MedicationRequest, Appointment and Consent are
unchanged between them), then mapped to the columns of the matching CSV file, so that
engine.importer validates FHIR and CSV rows with the same rules and messages.

Mapping (first match wins):

Patient -> patients.csv
    external_id    identifier[use=official|usual].value, else identifier[0].value, else id
    given_name     name[use=official|usual] (else name[0]).given, joined by spaces
    family_name    the same name's family
    phone          telecom[system=sms], else telecom[system=phone, use=mobile], else
                   telecom[system=phone]
    timezone       extension tz-code (http://hl7.org/fhir/StructureDefinition/tz-code or
                   .../timezone), valueCode
    locale         communication[preferred=true] (else [0]).language.coding[0].code
    country        address[0].country;  region: address[0].state
    birth_date     birthDate
    allow_phi_sms  extension ENGAGE_EXT/allow-phi-sms, valueBoolean
MedicationRequest -> prescriptions.csv
    external_id    subject (see references below);  rx_id: identifier[0].value, else id
    medication     medicationCodeableConcept.text, else its coding[0].display
    medication_class  extension ENGAGE_EXT/medication-class, else the coding whose system
                   is ATC (http://www.whocc.no/atc), code
    refill_due     extension ENGAGE_EXT/refill-due (valueDate), else authoredOn +
                   dispenseRequest.expectedSupplyDuration (days)
    status         status
Appointment -> appointments.csv
    external_id    the participant whose actor is a Patient;  appointment_id: identifier[0]
                   .value, else id;  starts_at: start;  status: status
    kind           appointmentType.coding[0].code, else serviceType[0].coding[0].code
    provider, location  display of the Practitioner / Location participant
Consent -> consents.csv
    external_id    patient;  purpose: provision.purpose[0].code
    status         granted when status is active and provision.type is permit (the
                   default); revoked when provision.type is deny or status is inactive
                   or rejected; draft, proposed and entered-in-error are refused
    legal_basis    policyRule.coding[0].code;  occurred_at: dateTime
    method         extension ENGAGE_EXT/consent-method;  notice_version: extension
                   ENGAGE_EXT/notice-version, else policy[0].uri

References to a patient resolve through the bundle (fullUrl or Patient/id of a Patient
entry, giving that patient's external id); "Patient/X" not in the bundle means the
patient with external id X; a reference by identifier uses identifier.value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

ENGAGE_EXT = "https://engage.example/fhir/StructureDefinition"
TZ_EXTENSIONS = (
    "http://hl7.org/fhir/StructureDefinition/tz-code",
    "http://hl7.org/fhir/StructureDefinition/timezone",
)
ATC = "http://www.whocc.no/atc"
KIND_OF = {
    "Patient": "patients",
    "MedicationRequest": "prescriptions",
    "Appointment": "appointments",
    "Consent": "consents",
}

Json = dict[str, Any]


class BundleError(ValueError):
    """The file is not a FHIR bundle at all (its entries are never half-read)."""


@dataclass(frozen=True)
class BundleRow:
    """One entry: the CSV kind and columns it maps to, or why it cannot be read."""

    label: str
    kind: str
    values: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Bundle:
    rows: list[BundleRow]
    ignored: dict[str, int]


def read_bundle(path: Path) -> Bundle:
    """Every supported entry of the bundle, patients first, then in bundle order."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BundleError("not readable: the JSON nests too deeply") from exc
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise BundleError("not a FHIR Bundle (resourceType must be 'Bundle')")
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise BundleError("Bundle.entry must be a list")
    patients = _patient_ids(entries)
    rows, ignored = [], {}
    for n, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        rtype = resource.get("resourceType", "?") if isinstance(resource, dict) else "?"
        rtype = rtype if isinstance(rtype, str) else "?"
        if rtype not in KIND_OF:
            ignored[rtype] = ignored.get(rtype, 0) + 1
            continue
        label = f"entry[{n}] ({rtype}/{resource.get('id', '?')})"
        rows.append(_row(label, rtype, resource, patients))
    rows.sort(key=lambda r: r.kind != "patients")
    return Bundle(rows=rows, ignored=ignored)


def _row(label: str, rtype: str, resource: Json, patients: dict[str, str]) -> BundleRow:
    kind = KIND_OF[rtype]
    try:
        get_fhir_model_class(rtype).model_validate(resource)
    except ValidationError as exc:
        return BundleRow(label, kind, error=f"invalid {rtype}: {_first_error(exc)}")
    try:
        values = MAPPERS[rtype](resource, patients)
    except MappingError as exc:
        return BundleRow(label, kind, error=str(exc))
    except (AttributeError, TypeError, KeyError) as exc:  # a shape the model let through
        return BundleRow(label, kind, error=f"cannot map {rtype}: unexpected {exc}")
    return BundleRow(label, kind, {k: v for k, v in values.items() if v is not None})


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "resource"
    message = str(error["msg"]).removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    return f"{where}: {message}" + (f" (and {more} more)" if more else "")


class MappingError(ValueError):
    pass


def _patient_ids(entries: list[Any]) -> dict[str, str]:
    """Reference forms of each Patient entry (fullUrl, Patient/id) -> its external id."""
    refs: dict[str, str] = {}
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
            continue
        try:  # not validated yet: an invalid Patient is reported by its own row
            external_id = _patient_external_id(resource)
        except (AttributeError, TypeError, KeyError):
            continue
        if isinstance(resource.get("id"), str) and resource["id"]:
            refs[f"Patient/{resource['id']}"] = external_id
        if isinstance(entry.get("fullUrl"), str) and entry["fullUrl"]:
            refs[entry["fullUrl"]] = external_id
    return refs


def _patient_external_id(resource: Json) -> str:
    identifiers = [i for i in resource.get("identifier") or [] if i.get("value")]
    preferred = [i for i in identifiers if i.get("use") in ("official", "usual")]
    chosen = (preferred or identifiers or [{"value": resource.get("id", "")}])[0]
    return str(chosen["value"])


def _patient_ref(reference: Json | None, patients: dict[str, str]) -> str:
    reference = reference or {}
    ref = reference.get("reference", "")
    if ref in patients:
        return patients[ref]
    if ref.startswith("Patient/"):
        return ref.removeprefix("Patient/")
    if (reference.get("identifier") or {}).get("value"):
        return str(reference["identifier"]["value"])
    raise MappingError(f"no patient reference ({ref or 'missing'})")


def _extension(resource: Json, *urls: str) -> str | None:
    for ext in resource.get("extension") or []:
        if ext.get("url") in urls:
            for key, value in ext.items():
                if key.startswith("value"):
                    return str(value).lower() if isinstance(value, bool) else str(value)
    return None


def _first(items: list[Any] | None, **match: Any) -> Json:
    for item in items or []:
        if all(item.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in match.items()):
            return item
    return {}


def _patient(resource: Json, _patients: dict[str, str]) -> dict[str, str | None]:
    names = resource.get("name") or []
    name = _first(names, use=("official", "usual")) or _first(names)
    telecom = resource.get("telecom") or []
    phone = (
        _first(telecom, system="sms")
        or _first(telecom, system="phone", use="mobile")
        or _first(telecom, system="phone")
    )
    comms = resource.get("communication") or []
    comm = _first(comms, preferred=True) or _first(comms)
    address = _first(resource.get("address"))
    return {
        "external_id": _patient_external_id(resource),
        "given_name": " ".join(name.get("given") or []),
        "family_name": name.get("family", ""),
        "phone": phone.get("value", ""),
        "timezone": _extension(resource, *TZ_EXTENSIONS),
        "locale": _first((comm.get("language") or {}).get("coding")).get("code"),
        "country": address.get("country"),
        "region": address.get("state"),
        "birth_date": resource.get("birthDate"),
        "allow_phi_sms": _extension(resource, f"{ENGAGE_EXT}/allow-phi-sms"),
    }


def _record_id(resource: Json) -> str:
    identifier = _first([i for i in resource.get("identifier") or [] if i.get("value")])
    return str(identifier.get("value") or resource.get("id", ""))


def _medication_request(resource: Json, patients: dict[str, str]) -> dict[str, str | None]:
    if "medicationReference" in resource:
        raise MappingError("medicationReference is not supported; use medicationCodeableConcept")
    concept = resource.get("medicationCodeableConcept") or {}
    return {
        "external_id": _patient_ref(resource.get("subject"), patients),
        "rx_id": _record_id(resource),
        "medication": concept.get("text") or _first(concept.get("coding")).get("display"),
        "medication_class": _extension(resource, f"{ENGAGE_EXT}/medication-class")
        or _first(concept.get("coding"), system=ATC).get("code"),
        "refill_due": _extension(resource, f"{ENGAGE_EXT}/refill-due") or _supply_end(resource),
        "status": resource.get("status"),
    }


def _supply_end(resource: Json) -> str | None:
    """authoredOn plus the expected supply duration, when both are given in days."""
    supply = (resource.get("dispenseRequest") or {}).get("expectedSupplyDuration") or {}
    authored = str(resource.get("authoredOn") or "")[:10]
    if not authored or supply.get("code", supply.get("unit")) not in ("d", "day", "days"):
        return None
    try:
        return (date.fromisoformat(authored) + timedelta(days=int(supply["value"]))).isoformat()
    except (KeyError, ValueError, TypeError):
        return None


def _appointment(resource: Json, patients: dict[str, str]) -> dict[str, str | None]:
    actors = [p.get("actor") or {} for p in resource.get("participant") or []]
    patient = next((a for a in actors if _is_patient(a, patients)), None)
    if patient is None:
        raise MappingError("no participant is a Patient")
    kind = _first((resource.get("appointmentType") or {}).get("coding")).get("code")
    service = _first(resource.get("serviceType"))
    return {
        "external_id": _patient_ref(patient, patients),
        "appointment_id": _record_id(resource),
        "starts_at": resource.get("start"),
        "kind": kind or _first(service.get("coding")).get("code"),
        "provider": _actor_display(actors, "Practitioner/"),
        "location": _actor_display(actors, "Location/"),
        "status": resource.get("status"),
    }


def _is_patient(actor: Json, patients: dict[str, str]) -> bool:
    ref = actor.get("reference", "")
    return ref in patients or ref.startswith("Patient/") or actor.get("type") == "Patient"


def _actor_display(actors: list[Json], prefix: str) -> str:
    actor = next((a for a in actors if a.get("reference", "").startswith(prefix)), {})
    return str(actor.get("display", ""))


def _consent(resource: Json, patients: dict[str, str]) -> dict[str, str | None]:
    provision = resource.get("provision") or {}
    status = resource.get("status")
    if status not in ("active", "inactive", "rejected"):
        raise MappingError(f"Consent status '{status}' does not record a decision")
    granted = status == "active" and provision.get("type", "permit") == "permit"
    policy = _first(resource.get("policy"))
    return {
        "external_id": _patient_ref(resource.get("patient"), patients),
        "purpose": _first(provision.get("purpose")).get("code"),
        "status": "granted" if granted else "revoked",
        "legal_basis": _first((resource.get("policyRule") or {}).get("coding")).get("code"),
        "method": _extension(resource, f"{ENGAGE_EXT}/consent-method"),
        "notice_version": _extension(resource, f"{ENGAGE_EXT}/notice-version") or policy.get("uri"),
        "occurred_at": resource.get("dateTime"),
    }


MAPPERS = {
    "Patient": _patient,
    "MedicationRequest": _medication_request,
    "Appointment": _appointment,
    "Consent": _consent,
}
