package admin

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Role is what a token may do.
type Role int

// The roles.
const (
	// RoleRead may call the Get, List, Watch and Export methods.
	RoleRead Role = iota + 1
	// RoleOperator may call every method.
	RoleOperator
)

// Token is one admin credential.
type Token struct {
	Name  string
	Value string
	Role  Role
}

// ParseTokens reads "name:token:role" triples, role being "read" or "operator".
func ParseTokens(specs []string) ([]Token, error) {
	var out []Token
	for _, s := range specs {
		parts := strings.Split(s, ":")
		if len(parts) != 3 || parts[0] == "" || len(parts[1]) < 6 {
			return nil, fmt.Errorf("admin token %q: want name:token:role with a token of 6+ characters", parts[0])
		}
		var r Role
		switch parts[2] {
		case "read":
			r = RoleRead
		case "operator":
			r = RoleOperator
		default:
			return nil, fmt.Errorf("admin token %q: role %q: want read or operator", parts[0], parts[2])
		}
		out = append(out, Token{Name: parts[0], Value: parts[1], Role: r})
	}
	if len(out) == 0 {
		return nil, errors.New("at least one admin token is required")
	}
	return out, nil
}

// readMethods may be called with a read-only token.
var readMethods = map[string]bool{
	"GetDestination": true, "ListDestinations": true, "GetDestinationHealth": true,
	"ListDestinationHealth": true, "WatchDecisions": true, "ExportParked": true,
}

type actorKey struct{}

// Authenticate is the grpcserver.AuthFunc of the AdminService.
func (s *Server) Authenticate(ctx context.Context, fullMethod, token string) (context.Context, error) {
	var found *Token
	for i := range s.tokens {
		if constantTimeEqual(s.tokens[i].Value, token) {
			found = &s.tokens[i]
		}
	}
	if found == nil {
		return nil, status.Error(codes.Unauthenticated, "unknown admin token")
	}
	method := fullMethod[strings.LastIndex(fullMethod, "/")+1:]
	if found.Role != RoleOperator && !readMethods[method] {
		return nil, status.Errorf(codes.PermissionDenied, "token %q is read-only; %s needs an operator token", found.Name, method)
	}
	return context.WithValue(ctx, actorKey{}, found.Name), nil
}

func actor(ctx context.Context) string {
	a, _ := ctx.Value(actorKey{}).(string)
	return a
}
