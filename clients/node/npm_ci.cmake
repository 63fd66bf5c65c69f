# Installs the Node client's pinned dependencies into the build tree (never the source tree):
#   cmake -DNPM=<npm> -DSRC=<clients/node> -DDST=<build>/clients/node -P npm_ci.cmake
# Copies package.json + package-lock.json to DST and runs `npm ci` there, unless DST already holds
# node_modules installed from an identical lock file (a stamp records its hash). Fails (so the
# CTest fixture fails) when npm is missing or the install fails.
foreach(var NPM SRC DST)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "npm_ci.cmake: -D${var}= is required")
  endif()
endforeach()
if(NOT EXISTS "${NPM}")
  message(FATAL_ERROR "npm_ci.cmake: npm not found ('${NPM}'); install nodejs and npm "
                      "(scripts/install_deps.sh)")
endif()

file(MAKE_DIRECTORY "${DST}")
file(SHA256 "${SRC}/package-lock.json" lock_hash)
file(SHA256 "${SRC}/package.json" package_hash)
set(stamp "${DST}/node_modules/.ds-npm-ci-stamp")
set(want "${lock_hash} ${package_hash}")
if(EXISTS "${stamp}")
  file(READ "${stamp}" have)
  if(have STREQUAL want)
    message(STATUS "npm_ci.cmake: node_modules up to date in ${DST}")
    return()
  endif()
endif()

configure_file("${SRC}/package.json" "${DST}/package.json" COPYONLY)
configure_file("${SRC}/package-lock.json" "${DST}/package-lock.json" COPYONLY)
execute_process(
  COMMAND "${NPM}" ci --no-audit --no-fund --ignore-scripts --prefer-offline
  WORKING_DIRECTORY "${DST}"
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "npm_ci.cmake: npm ci failed in ${DST} (exit ${rc})")
endif()
file(WRITE "${stamp}" "${want}")
