"""Varied JSON schemas for structured-output tests and benchmarks.

``SCHEMAS`` holds (name, schema, prompt) triples: nested objects, arrays, enums, numbers with
bounds, required and optional fields, ``anyOf``, ``$defs`` references, patterns and formats,
all within the subset constrained decoding serves (cluster/json_schema_subset.py). Every
string, array and number is bounded, so a small model forced through the grammar finishes
within a few hundred tokens: the guarantee under test is that the output parses and
validates, not that a 135M model writes good answers.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def s(max_length: int = 24, **extra: Any) -> Schema:
    return {"type": "string", "maxLength": max_length, **extra}


def i(lo: int, hi: int) -> Schema:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def n(lo: float, hi: float, **extra: Any) -> Schema:
    return {"type": "number", "minimum": lo, "maximum": hi, **extra}


def enum(*values: Any) -> Schema:
    return {"enum": list(values)}


def arr(items: Schema, lo: int = 0, hi: int = 3) -> Schema:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


def obj(props: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """An object of these properties (all required unless ``required`` says otherwise) that
    allows no others, as OpenAI's strict mode and pydantic's ``extra='forbid'`` write them."""
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


BOOL: Schema = {"type": "boolean"}
ADDRESS = obj({"street": s(30), "city": s(20), "zip": s(10, pattern="^[0-9]{5}$")})

SCHEMAS: list[tuple[str, Schema, str]] = [
    ("person", obj({"name": s(), "age": i(0, 120)}), "Describe a person."),
    ("city", obj({"name": s(), "country": s(), "population": i(0, 40_000_000)}),
     "Tell me about Paris."),
    ("yes_no", obj({"answer": BOOL}), "Is the sky blue?"),
    ("sentiment", obj({"label": enum("positive", "negative", "neutral"),
                       "score": n(0, 1)}), "Classify: 'I love this phone.'"),
    ("weather", obj({"city": s(), "celsius": n(-60, 60), "sky": enum("sunny", "cloudy", "rain")}),
     "Weather in Oslo today."),
    ("todo", obj({"title": s(30), "done": BOOL, "priority": i(1, 5)}), "A todo item."),
    ("todo_list", obj({"items": arr(obj({"title": s(20), "done": BOOL}), 1, 3)}),
     "Three things to do today."),
    ("tags", obj({"tags": arr(s(12), 1, 4)}), "Tags for a blog post about cooking."),
    ("scores", obj({"scores": arr(i(0, 100), 2, 4)}), "Test scores of a class."),
    ("point", obj({"x": n(-100, 100), "y": n(-100, 100)}), "A point on a plane."),
    ("rgb", obj({"r": i(0, 255), "g": i(0, 255), "b": i(0, 255)}), "The colour orange."),
    ("optional_nickname", obj({"name": s(), "nickname": s()}, required=["name"]),
     "A person who may have a nickname."),
    ("all_optional", obj({"title": s(), "year": i(1900, 2030)}, required=[]),
     "A film you like."),
    ("nested_address", obj({"name": s(), "address": ADDRESS}), "Where does Ann live?"),
    ("deep_nesting", obj({"company": obj({"name": s(), "ceo": obj({
        "name": s(), "age": i(20, 90)})})}), "A company and its chief executive."),
    ("order", obj({"order_id": s(12, pattern="^[A-Z]{2}[0-9]{4}$"),
                   "lines": arr(obj({"sku": s(10), "qty": i(1, 9), "price": n(0, 1000)}), 1, 3),
                   "paid": BOOL}), "An order for two books."),
    ("nullable_field", obj({"name": s(), "email": {"anyOf": [s(40), {"type": "null"}]}}),
     "A customer without an email address."),
    ("union_value", obj({"value": {"anyOf": [i(0, 10), s(10)]}}), "A value, number or word."),
    ("type_list", obj({"id": {"type": ["integer", "string"], "maxLength": 8, "minimum": 0,
                               "maximum": 999}}), "An identifier."),
    ("const_version", obj({"version": {"const": 2}, "name": s()}), "A version 2 record."),
    ("enum_numbers", obj({"stars": enum(1, 2, 3, 4, 5)}), "Rate a restaurant."),
    ("mixed_enum", obj({"choice": enum("a", 1, True, None)}), "Pick anything."),
    ("exclusive_bounds", obj({"probability": {"type": "number", "exclusiveMinimum": 0,
                                              "exclusiveMaximum": 1}}),
     "Chance of rain tomorrow."),
    ("negative_range", obj({"temperature": i(-40, -1)}), "A cold winter temperature."),
    ("min_length", obj({"code": s(6, minLength=3)}), "A short code."),
    ("string_array_bounded", obj({"words": arr(s(8, minLength=1), 2, 2)}), "Two words."),
    ("matrix", obj({"rows": arr(arr(i(0, 9), 2, 2), 2, 2)}), "A 2x2 matrix of digits."),
    ("refs", {"$defs": {"Pet": obj({"name": s(), "kind": enum("cat", "dog", "fish")})},
              **obj({"owner": s(), "pets": arr({"$ref": "#/$defs/Pet"}, 1, 2)})},
     "A person and their pets."),
    ("ref_reused", {"$defs": {"Money": obj({"amount": n(0, 10_000), "currency": enum(
        "EUR", "USD", "GBP")})}, **obj({"price": {"$ref": "#/$defs/Money"},
                                         "tax": {"$ref": "#/$defs/Money"}})},
     "The price of a bike."),
    ("date_format", obj({"event": s(), "date": {"type": "string", "format": "date"}}),
     "A holiday and its date."),
    ("uuid_format", obj({"id": {"type": "string", "format": "uuid"}}), "A unique id."),
    ("email_format", obj({"email": {"type": "string", "format": "email", "maxLength": 40}}),
     "An email address."),
    ("flat_many", obj({f"f{k}": i(0, 9) for k in range(8)}), "Eight digits."),
    ("booleans", obj({"a": BOOL, "b": BOOL, "c": BOOL}), "Three flags."),
    ("recipe", obj({"title": s(), "minutes": i(1, 240),
                    "ingredients": arr(obj({"name": s(16), "grams": i(1, 1000)}), 1, 3),
                    "vegetarian": BOOL}), "A pancake recipe."),
    ("event", obj({"name": s(), "attendees": arr(obj({"name": s(16), "rsvp": enum(
        "yes", "no", "maybe")}), 0, 3), "location": obj({"city": s(16)}, required=[])}),
     "A birthday party."),
    ("flight", obj({"from": s(3, pattern="^[A-Z]{3}$"), "to": s(3, pattern="^[A-Z]{3}$"),
                    "stops": i(0, 3), "price": n(1, 5000)}), "A flight from Paris to Rome."),
    ("movie_review", obj({"title": s(), "rating": n(0, 10), "pros": arr(s(20), 0, 2),
                          "cons": arr(s(20), 0, 2)}), "Review a film."),
    ("product", obj({"name": s(), "in_stock": BOOL, "sizes": arr(enum("S", "M", "L"), 1, 3),
                     "discount": {"anyOf": [n(0, 0.9), {"type": "null"}]}}),
     "A T-shirt for sale."),
    ("invoice", obj({"number": i(1, 99999), "customer": obj({"name": s(), "vat": s(14)},
                                                          required=["name"]),
                     "total": n(0, 100000)}), "An invoice."),
    ("book", obj({"title": s(30), "authors": arr(s(20), 1, 2), "year": i(1450, 2030),
                  "isbn": s(13, pattern="^[0-9]{13}$")}), "A well known novel."),
    ("calendar_slot", obj({"day": enum("mon", "tue", "wed", "thu", "fri"),
                           "start_hour": i(8, 17), "length_minutes": enum(15, 30, 60)}),
     "A meeting slot."),
    ("classification", obj({"category": enum("billing", "technical", "sales", "other"),
                            "urgent": BOOL, "summary": s(40)}),
     "Classify: 'My invoice is wrong and I need it fixed today.'"),
    ("nested_optional", obj({"user": obj({"name": s(), "settings": obj({
        "theme": enum("light", "dark"), "font_size": i(8, 32)}, required=[])},
        required=["name"])}), "A user and their settings."),
    ("top_level_array", arr(obj({"name": s(12), "score": i(0, 10)}), 1, 3),
     "Scores of three players."),
    ("top_level_enum", enum("red", "green", "blue"), "Your favourite primary colour."),
    ("top_level_number", n(0, 100), "A percentage."),
    ("allof_single", obj({"shipping": {"allOf": [ADDRESS], "description": "where to ship"}}),
     "A shipping address."),
]
