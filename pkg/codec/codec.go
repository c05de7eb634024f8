// Package codec is the one home of the format of Bulkhead's stored control
// values: KV values (destinations, decisions) and audit records are protojson
// with proto field names, so an operator reads them with `nats kv get` or
// `nats sub` as they are. (Data-plane messages are binary protobuf.)
package codec

import (
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

var (
	marshal   = protojson.MarshalOptions{UseProtoNames: true}
	unmarshal = protojson.UnmarshalOptions{DiscardUnknown: true}
)

// Encode returns the stored form of m.
func Encode(m proto.Message) ([]byte, error) { return marshal.Marshal(m) }

// Decode parses a stored value into m; unknown fields (written by a newer
// version) are ignored.
func Decode(b []byte, m proto.Message) error { return unmarshal.Unmarshal(b, m) }
